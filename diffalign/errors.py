"""One error type for bad input: the CLI prints it as one line and exits with status 2."""
from __future__ import annotations


class BenchError(Exception):
    """A problem with what the user asked for; the message names it and what is accepted."""

