"""`kontext-trt`: one console script; each folder contributes its subcommands through add_parsers()."""
from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kontext-trt", description=__doc__.split(":")[1].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a KontextError becomes one line on stderr and its exit code (2 bad input, 1 failed write)."""
    args = build_parser().parse_args(argv)
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
