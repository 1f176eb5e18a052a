"""The error types the CLI turns into a single `error: ...` line: bad input exits 2, a failed write exits 1."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

T = TypeVar("T")


class KontextError(Exception):
    """A user-facing error: `message` says what is wrong and how to fix it; `param` names the flag or request field
    at fault (None when no one field is), `code` is a stable machine word (out_of_range, invalid_value,
    unsupported_format, not_found, gpu_mismatch, ...). The CLI prints the message as one line and exits 2; the server
    answers 400 with OpenAI's error shape carrying param and code."""

    exit_code: int = 2

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def flag_param(flag: str, default: str | None = None) -> str | None:
    """The request field a CLI flag names: --true-cfg -> true_cfg (the server's form field); `default` for a name
    that is no flag (like "output folder")."""
    if not flag.startswith("--"):
        return default
    return flag.removeprefix("--").split()[0].replace("-", "_")


class WriteError(KontextError):
    """Writing an output failed on the file system (disk full, read-only); nothing partial was left (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, param: str | None = "out", code: str = "write_failed") -> None:
        super().__init__(message, param, code)


class Cancelled(KontextError):
    """An edit stopped between denoising steps because every request of its batch was cancelled (the server's
    timeout, or the client hung up); nothing was returned."""

    def __init__(self, message: str = "the edit was cancelled", param: str | None = None,
                 code: str = "cancelled") -> None:
        super().__init__(message, param, code)


def arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises KontextError: argparse prints its message as the usage error."""

    def parsed(text: str) -> T:
        try:
            return parse(text)
        except KontextError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parsed.__name__ = parse.__name__
    return parsed
