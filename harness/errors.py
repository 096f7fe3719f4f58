"""Errors that the CLI and pytest turn into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, never a traceback."""
