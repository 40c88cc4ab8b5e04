"""One error type for bad input: the CLI prints it as one line and exits with status 2."""
from __future__ import annotations


class BenchError(Exception):
    """A problem with what the user asked for; the message names it and what is accepted."""


def check_choice(key: str, value, accepted) -> None:
    """One error line naming the key, its value and what is accepted (a method's ``validate`` helper)."""
    if value not in accepted:
        raise BenchError(f"{key} {value!r}; accepted: {', '.join(map(str, accepted))}")
