"""`python -m bench ...` called in-process for tests: the exit code and what it printed on stdout."""

import contextlib
import io

from bench import cli


def capture(argv: list[str]) -> tuple[int, str]:
    """Run bench's command line on `argv` in this process; return (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue()
