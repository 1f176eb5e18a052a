"""The one error type the CLI turns into a single line and exit code 2."""


class KontextError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
