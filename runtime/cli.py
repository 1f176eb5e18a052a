"""`kontext-trt`: one console script; each folder contributes its subcommands through add_parsers()."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from kontext_trt.runtime.errors import KontextError

# Modules with add_parsers(subparsers): each registers its subcommands and sets `func(args) -> int`.
COMMAND_MODULES = (
    "kontext_trt.runtime.commands",
    "kontext_trt.benchmarks.commands",
    "kontext_trt.engines.commands",
    "kontext_trt.export.commands",
    "kontext_trt.quant.commands",
    "kontext_trt.serve.commands",
    "kontext_trt.safety.commands",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input, with exit code 2 (subcommand parsers
    inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = OneLineParser(prog="kontext-trt", description=__doc__.split(":")[1].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a usage error or a KontextError becomes one line on stderr and its exit code (2 bad input,
    1 failed write); --help returns 0."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
