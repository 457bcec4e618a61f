"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class TunefleetError(Exception):
    """Something the user can fix; the message says what and how."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: enough to say what went wrong without a traceback."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
