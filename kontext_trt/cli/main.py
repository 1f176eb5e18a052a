"""`kontext-trt`: one console script; each folder contributes its subcommands through add_parsers()."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from kontext_trt.core.checks import pick_device
from kontext_trt.core.errors import KontextError
from kontext_trt.core.timing import set_quiet

# Loggers whose warnings show even under --quiet: outputs written without the watermark, no safety checker.
ALWAYS_SHOWN = ("kontext_trt.safety",)
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Modules with add_parsers(subparsers): each registers its subcommands and sets `func(args) -> int`.
COMMAND_MODULES = (
    "kontext_trt.cli.edit",
    "kontext_trt.cli.bench",
    "kontext_trt.cli.engines",
    "kontext_trt.cli.export",
    "kontext_trt.cli.quant",
    "kontext_trt.cli.serve",
    "kontext_trt.cli.safety",
    "kontext_trt.cli.train",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input, with exit code 2 (subcommand parsers
    inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; -v/--quiet go before or after the subcommand."""
    parser = OneLineParser(prog="kontext-trt", description=__doc__.split(":")[1].strip())
    add_verbosity(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=0, quiet=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    for command in subcommand_parsers(parser):
        add_verbosity(command, argparse.SUPPRESS)  # SUPPRESS: a flag given before the subcommand is kept
    return parser


def add_verbosity(p: argparse.ArgumentParser, default: object) -> None:
    """-v/--verbose (INFO, -vv DEBUG) and -q/--quiet (no progress lines, notes or bars; errors, safety warnings and
    results only)."""
    p.add_argument("-v", "--verbose", action="count", default=default, help="log more: -v info (e.g. the pipeline's "
                   "load time), -vv debug")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress lines, notes or bars; "
                   "errors, safety warnings and results only")


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (bench run, bench serve, ...), depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *subcommand_parsers(child)]
    return found


def log_level(args: argparse.Namespace) -> int:
    """The log level of -v/-q: WARNING by default, -v INFO, -vv DEBUG, --quiet ERROR."""
    return logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]


class StderrHandler(logging.StreamHandler):
    """A StreamHandler on sys.stderr as it is when a record is written (not when the handler was made), so a
    redirected stderr gets the log too."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def set_log_level(level: int, fmt: str = LOG_FORMAT) -> None:
    """Log on stderr at `level`; the ALWAYS_SHOWN loggers keep their warnings at any higher level."""
    logging.basicConfig(level=level, format=fmt, force=True, handlers=[StderrHandler()])
    for name in ALWAYS_SHOWN:
        logging.getLogger(name).setLevel(logging.WARNING if level > logging.WARNING else logging.NOTSET)


def configure(args: argparse.Namespace) -> None:
    """Logging on stderr at the level of -v/-q (log_level), and the progress switch."""
    set_log_level(log_level(args))
    set_quiet(args.quiet)
    if "device" in vars(args):  # the one --device default of every subcommand
        args.device = pick_device(args.device)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a usage error or a KontextError becomes one line on stderr and its exit code (2 bad input,
    1 failed write), running out of memory one line and exit 1; --help returns 0."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        configure(args)
        return int(args.func(args) or 0)
    except KontextError as exc:
        print(f"error: {' '.join(exc.message.splitlines())}", file=sys.stderr)  # one line, whatever a library said
        return exc.exit_code
    except Exception as exc:
        if not out_of_memory(exc):
            raise  # a bug or a GPU fault: the traceback is what a report needs (exit 1)
        print(f"error: out of memory ({str(exc).splitlines()[0][:200]}): use a smaller --batch or size, --low-vram or "
              "--weight-streaming-budget on engines, or a GPU with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, a host MemoryError, or an ONNX Runtime / TensorRT allocation failure."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "failed to allocate memory" in text)


if __name__ == "__main__":
    sys.exit(main())
