"""-v/--quiet, progress bars and the one --device default: what reaches stderr, and when."""
import io
import logging
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kontext_trt.cli.main import build_parser, main, subcommand_parsers
from kontext_trt.core import image as im
from kontext_trt.core import timing
from kontext_trt.core.checks import pick_device


@pytest.fixture(autouse=True)
def restore_quiet():
    yield
    timing.set_quiet(False)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def edit_argv(tiny_ckpt, tmp_path):
    source = tmp_path / "in.png"
    im.sample_image(64, 64).save(source)
    return ["edit", "--model", str(tiny_ckpt), "--dtype", "fp32", "--image", str(source), "--prompt", "a cat",
            "--steps", "2", "--no-auto-resize", "--safety-checker", "none", "--out", str(tmp_path / "out.png")]


def test_quiet_keeps_results_and_drops_progress(capsys, tiny_ckpt, tmp_path):
    argv = edit_argv(tiny_ckpt, tmp_path)
    assert main(argv) == 0
    loud = capsys.readouterr()
    assert "loading" in loud.err or "..." in loud.err or "license" in loud.err.lower()
    assert "note: no C2PA manifest" in loud.err and "loaded the torch pipeline" not in loud.err  # a note; no INFO
    assert main(["--quiet", *argv]) == 0
    quiet = capsys.readouterr()
    assert str(tmp_path / "out.png") in quiet.out and "64x64, 2 steps" in quiet.out  # results stay on stdout
    assert "..." not in quiet.err and "done in" not in quiet.err and "no C2PA manifest" not in quiet.err
    # Safety warnings stay under --quiet: no safety checker, and 64x64 is written without the watermark.
    assert quiet.err.splitlines() == [
        "WARNING kontext_trt.safety.checker: no safety checker: the FLUX.1 [dev] Non-Commercial License obliges you "
        "to filter or review outputs before you share them",
        "WARNING kontext_trt.safety.guard: outputs of 64x64 are under 256x256 pixels: written without the invisible "
        "watermark"]


def test_verbose_logs_the_pipeline_load_time(capsys, tiny_ckpt, tmp_path):
    assert main(["-v", *edit_argv(tiny_ckpt, tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("INFO kontext_trt.assemble")]
    assert len(lines) == 1 and re.fullmatch(rf"INFO kontext_trt.assemble: loaded the torch pipeline \(fp32\) from "
                                            rf"{re.escape(str(tiny_ckpt))} in \d+\.\d\ds", lines[0]), lines


# The fewest arguments each subcommand parses with.
SUBCOMMANDS = {
    ("bench", "run"): ["--out", "o"], ("bench", "serve"): [], ("bench", "compare"): ["a.json", "b.json"],
    ("serve",): [], ("verify",): ["x.png"], ("build",): ["--onnx", "x", "--out", "o"],
    ("check",): ["--engines", "e", "--onnx", "x"], ("export",): ["--model", "m", "--out", "o"],
    ("quantize",): ["--model", "m", "--precision", "fp8", "--out", "o"],
    ("quantize-export",): ["--model", "m", "--out", "o"],
    ("synth",): ["o"], ("edit",): ["--prompt", "x", "--out", "o.png"], ("demo",): [],
    ("train", "shapes"): ["--out", "o"], ("eval",): ["--model", "m"],
}


def leaf_commands(parser, path=()) -> set[tuple[str, ...]]:
    """Every runnable subcommand as its words, e.g. ("bench", "run")."""
    found = set()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                found |= leaf_commands(child, (*path, name)) or {(*path, name)}
    return found


def test_every_subcommand_takes_verbose_and_quiet_before_or_after():
    parser = build_parser()
    assert leaf_commands(parser) == set(SUBCOMMANDS)  # a new subcommand is listed here
    assert len(subcommand_parsers(parser)) == len(SUBCOMMANDS) + 2  # and `bench` and `train` themselves
    for words, rest in SUBCOMMANDS.items():
        for argv, verbose, quiet in ((["-v", *words, *rest], 1, False), ([*words, *rest, "-q"], 0, True),
                                     (["-q", *words, *rest, "-vv"], 2, True), ([*words, *rest], 0, False),
                                     (["--quiet", *words, *rest, "--verbose"], 1, True)):
            args = parser.parse_args(argv)
            assert (args.verbose, args.quiet) == (verbose, quiet) and callable(args.func), argv
    nested = parser.parse_args(["bench", "-v", "run", "--out", "o"])  # between the words, too
    assert nested.verbose == 1 and nested.func.__name__ == "run_bench_command"


def test_flags_go_before_or_after_the_subcommand():
    parser = build_parser()
    before = parser.parse_args(["-vv", "synth", "out"])
    after = parser.parse_args(["synth", "out", "-v", "--quiet"])
    plain = parser.parse_args(["bench", "compare", "a.json", "b.json"])
    assert (before.verbose, before.quiet) == (2, False) and (after.verbose, after.quiet) == (1, True)
    assert (plain.verbose, plain.quiet) == (0, False)


def test_verbose_sets_the_log_level(monkeypatch):
    from kontext_trt.cli import edit as commands
    levels = []
    monkeypatch.setattr(commands, "run_synth", lambda args: levels.append(logging.getLogger().level) or 0)
    for flags, level in (([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                         (["--quiet"], logging.ERROR)):
        assert main([*flags, "synth", "unused"]) == 0
        assert levels[-1] == level, flags


def test_bar_is_off_when_quiet_and_off_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert list(timing.bar(range(3), "denoising", unit="step")) == [0, 1, 2]
    assert "denoising:   0%" in terminal.getvalue() and "0/3" in terminal.getvalue()  # shown, then cleared
    timing.set_quiet(True)
    terminal.seek(0), terminal.truncate()
    assert list(timing.bar(range(3), "denoising")) == [0, 1, 2] and terminal.getvalue() == ""
    timing.set_quiet(False)
    pipe = io.StringIO()  # not a terminal: a log file or CI
    monkeypatch.setattr("sys.stderr", pipe)
    assert list(timing.bar(range(3), "denoising")) == [0, 1, 2] and pipe.getvalue() == ""


def test_device_default_is_cpu_here_and_announced_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert pick_device(None) == "cpu"
    assert terminal.getvalue() == "device: cpu (no CUDA GPU is visible; --device cpu|cuda|cuda:N picks another)\n"
    assert pick_device("cuda:1") == "cuda:1" and terminal.getvalue().count("\n") == 1  # given: not announced
    timing.set_quiet(True)
    assert pick_device(None) == "cpu" and terminal.getvalue().count("\n") == 1


def test_every_device_flag_defaults_alike():
    parser = build_parser()
    for argv in (["edit", "--prompt", "x", "--out", "o.png"], ["quantize", "--model", "m", "--out", "o", "--precision", "fp8"],
                 ["bench", "run", "--out", "o"], ["serve"]):
        assert parser.parse_args(argv).device is None, argv  # resolved by pick_device before the command runs


def test_serve_log_level_follows_verbose_and_quiet_unless_given(monkeypatch, tiny_ckpt):
    from kontext_trt.cli.serve import serve_config
    from kontext_trt.serve import server
    seen = []
    monkeypatch.setattr(server, "run_local", lambda config: seen.append(
        (config.log_level, logging.getLogger().level, logging.getLogger("kontext_trt.safety.guard").getEffectiveLevel(),
         timing.is_quiet())) or 0)
    for flags, level in (([], "info"), (["-v"], "debug"), (["-vv"], "debug"), (["-q"], "error"),
                         (["--log-level", "warning", "-v"], "warning"), (["-q", "--log-level", "debug"], "debug")):
        assert main(["serve", "--model", str(tiny_ckpt), *flags]) == 0
        number = getattr(logging, level.upper())
        assert seen[-1] == (level, number, min(number, logging.WARNING), "-q" in flags), flags
    # The Ray Serve entry point (app_builder) parses the same flags into a ServeConfig.
    assert serve_config(build_parser().parse_args(["serve", "--model", str(tiny_ckpt), "-q"])).log_level == "error"
    assert serve_config(build_parser().parse_args(["-v", "serve", "--model", str(tiny_ckpt)])).log_level == "debug"


class OnTerminal:
    """`kontext-trt ARGV` started with stdin, stdout and stderr on a pseudo-terminal (isatty() is True, as for a user
    at a shell)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv, (self.master, slave) = argv, os.openpty()
        path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, "-m", "kontext_trt.cli.main", *argv], stdin=slave,
                                     stdout=slave, stderr=slave, env={**os.environ, "PYTHONPATH": path}, close_fds=True)
        os.close(slave)

    def finish(self, deadline: float) -> tuple[int, str]:
        """Its exit code and everything the terminal showed (\n line ends); fails the test past `deadline`."""
        shown = bytearray()
        try:
            while True:
                ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    pytest.fail(f"kontext-trt {' '.join(self.argv)} ran too long; it showed {shown.decode()!r}")
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal (Linux)
                    break
                if not chunk:
                    break
                shown += chunk
            code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)
        return code, shown.decode().replace("\r\n", "\n")


def test_progress_shows_on_a_terminal_and_quiet_leaves_only_the_result(tmp_path):
    loud, quiet = tmp_path / "loud", tmp_path / "quiet"
    runs = OnTerminal(["synth", str(loud)]), OnTerminal(["synth", str(quiet), "-q"])  # side by side: half the time
    deadline = time.monotonic() + 90  # ~15 s on two idle cores
    (code, shown), (quiet_code, quiet_shown) = (run.finish(deadline) for run in runs)
    lines = shown.splitlines()
    assert code == 0 and lines[-1] == str(loud), shown  # the result, on stdout
    components = ["tokenizers", "text_encoder (CLIP)", "text_encoder_2 (T5)", "vae", "transformer"]
    assert [line.split(" done: ")[0] for line in lines[:-1]] == [f"[synth] {c}" for c in components], shown
    assert all(re.search(r" done: \d+\.\d MiB written, \d+\.\ds$", line) for line in lines[:-1]), shown
    assert quiet_code == 0 and quiet_shown == f"{quiet}\n"  # nothing but the result


def test_errors_stay_under_quiet(capsys, tiny_ckpt):
    assert main(["-q", "synth", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tiny_ckpt}") and err.count("\n") == 1, err
