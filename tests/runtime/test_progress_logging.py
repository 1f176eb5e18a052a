"""-v/--quiet, progress bars and the one --device default: what reaches stderr, and when."""
import io
import logging

import pytest

from kontext_trt.cli.main import build_parser, main
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
    assert main(["--quiet", *argv]) == 0
    quiet = capsys.readouterr()
    assert str(tmp_path / "out.png") in quiet.out and "64x64, 2 steps" in quiet.out  # results stay on stdout
    assert " ... " not in quiet.err and "done in" not in quiet.err


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
