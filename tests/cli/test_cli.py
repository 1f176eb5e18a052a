"""The CLI: edits that work end to end, and one clear line with exit code 2 for each bad input."""
import json

import pytest
from PIL import Image

from kontext_trt.cli.main import main
from kontext_trt.core import image as im


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "in.png"
    im.sample_image(96, 64).save(path)
    return path


def test_edit_writes_png_with_metadata(capsys, tiny_ckpt, sample, tmp_path):
    out = tmp_path / "out.png"
    code, stdout, _ = run(capsys, "edit", "--model", tiny_ckpt, "--image", sample, "--prompt", "add a moon",
                          "--out", out, "--steps", 2, "--seed", 4, "--no-auto-resize")
    assert code == 0 and str(out) in stdout
    meta = json.loads(Image.open(out).text["kontext-trt"])
    assert meta["prompt"] == "add a moon" and meta["seed"] == 4 and meta["steps"] == 2
    assert (meta["width"], meta["height"]) == (96, 64) and meta["backend"] == "torch"
    assert len(meta["checkpoint"]) == 16


def test_batch_writes_one_file_per_prompt(capsys, tiny_ckpt, tmp_path):
    out = tmp_path / "t2i.png"
    code, _, _ = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", "a cat", "--prompt", "a dog",
                     "--out", out, "--steps", 1, "--width", 64, "--height", 64)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i-0.png", "t2i-1.png"]
    assert json.loads(Image.open(tmp_path / "t2i-1.png").text["kontext-trt"])["prompt"] == "a dog"


def test_klein_edit_and_generate_without_steps_run_and_print_four(capsys, klein_tiny_ckpt, sample, tmp_path):
    """No --steps: klein-tiny (step-distilled) runs its 4 steps, printed and recorded; --steps still wins."""
    for name, extra in (("edit", ["--image", sample]), ("generate", ["--width", 64, "--height", 64]),
                        ("given", ["--width", 64, "--height", 64, "--steps", 2])):
        out = tmp_path / f"{name}.png"
        code, stdout, _ = run(capsys, "edit", "--model", klein_tiny_ckpt, "--dtype", "fp32", "--prompt", "add snow",
                              "--safety-checker", "none", "--out", out, *extra)
        steps = 2 if name == "given" else 4
        assert code == 0 and f" {steps} steps in " in stdout
        assert json.loads(Image.open(out).text["kontext-trt"])["steps"] == steps


@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "steps must be at least 1"),
    (["--width", "100", "--height", "64"], "not a multiple of 16"),
    (["--width", "4096", "--height", "64"], "out of range"),
    (["--width", "64"], "both --width and --height"),
])
def test_bad_sampling_arguments(capsys, tiny_ckpt, sample, tmp_path, extra, message):
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--image", sample, "--prompt", "x",
                       "--out", tmp_path / "o.png", *extra)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_unreadable_image(capsys, tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 10)
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--image", bad, "--prompt", "x", "--out", tmp_path / "o.png")
    assert code == 2 and "bad.jpg is unreadable" in err and err.count("\n") == 1


def test_unwritable_output(capsys, tiny_ckpt, sample, tmp_path):
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--image", sample, "--prompt", "x",
                       "--out", tmp_path / "missing" / "o.png")
    assert code == 2 and "does not exist" in err


def test_long_prompt_warns_and_truncates(capsys, tiny_ckpt, tmp_path):
    prompt = " ".join(["replace the red house with a tall glass tower"] * 80)
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", prompt, "--out", tmp_path / "o.png",
                       "--steps", 1, "--width", 64, "--height", 64)
    assert code == 0
    assert "longer than T5's 512 tokens" in err and "longer than CLIP's 77 tokens" in err


def test_cuda_without_gpu(capsys, tiny_ckpt, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", "x", "--out", tmp_path / "o.png",
                       "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


def test_jpeg_and_webp_outputs_are_what_their_suffix_says(capsys, tiny_ckpt, tmp_path):
    for suffix, fmt in ((".jpg", "JPEG"), (".webp", "WEBP")):
        out = tmp_path / f"o{suffix}"
        code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", "a cat", "--out", out, "--steps", 1,
                           "--width", 64, "--height", 64, "--seed", 3)
        assert code == 0, err
        with Image.open(out) as img:
            assert img.format == fmt and img.size == (64, 64)
            meta = json.loads(img.getexif()[0x010E])
            if fmt == "JPEG":
                assert json.loads(img.info["comment"]) == meta
        assert meta["prompt"] == "a cat" and meta["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jpg", "o.webp"]


def test_disk_full_while_saving_is_one_line_exit_1_and_no_file(capsys, tiny_ckpt, tmp_path, monkeypatch):
    import errno

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, _, err = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", "a cat", "--out", tmp_path / "o.png",
                       "--steps", 1, "--width", 64, "--height", 64)
    assert code == 1 and err.count("error:") == 1 and err.splitlines()[-1].startswith("error: writing ")
    assert "No space left on device (ENOSPC)" in err and list(tmp_path.iterdir()) == []


def test_stale_temp_of_a_killed_edit_is_removed(capsys, tiny_ckpt, tmp_path):
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / f".o.png.{dead}-00ff.tmp").write_bytes(b"half")  # left by an edit killed while saving
    code, _, _ = run(capsys, "edit", "--model", tiny_ckpt, "--prompt", "a", "--out", tmp_path / "o.png", "--steps", 1,
                     "--width", 64, "--height", 64)
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys):
    import torch

    from kontext_trt.cli import edit as commands
    from kontext_trt.cli.main import main

    def run_out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(commands, "run_synth", run_out_of_memory)
    assert main(["synth", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (CUDA out of memory.") and "--low-vram" in err and err.count("\n") == 1
