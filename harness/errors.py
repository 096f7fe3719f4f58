"""Errors that the CLI and pytest turn into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, never a traceback."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")
