"""The error types the CLI turns into a single `error: ...` line: bad input exits 2, a failed write exits 1."""


class KontextError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (exit code 2)."""

    exit_code: int = 2


class WriteError(KontextError):
    """Writing an output failed on the file system (disk full, read-only); nothing partial was left (exit code 1)."""

    exit_code = 1
