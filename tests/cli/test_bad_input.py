"""Every class of bad input: exit 2, exactly one `error:` line on stderr (the last; progress lines may precede it)
naming what the user typed, no traceback, and nothing written. Every case runs in-process through the console
script's entry point `main(argv)` (arguments given as bytes are decoded as Python decodes a real argv); a handful,
one per subcommand, also run as the installed console script itself.

Tests run as root here, so permission bits stop nothing: a read-only output is simulated by paths the kernel refuses
even to root (/sys: EACCES, /proc: ENOENT), and an unreadable file by a folder where the file is expected.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
from onnx import TensorProto, helper, save

from kontext_trt.cli.main import main
from kontext_trt.core import image as im

SCRIPT = Path(sys.executable).with_name("kontext-trt")


def console(*argv, cwd=None) -> subprocess.CompletedProcess:
    """Run the console script (arguments may be bytes, like a shell passing undecodable text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [a if isinstance(a, bytes) else str(a) for a in argv]
    return subprocess.run([str(SCRIPT), *args], capture_output=True, env=env, cwd=cwd, timeout=600)


def in_process(argv: list, capsys) -> tuple[int, str]:
    """main(argv) as the console script runs it: (exit code, stderr). Bytes become what sys.argv holds for them
    (os.fsdecode: undecodable bytes as surrogates); warnings are ignored, as PYTHONWARNINGS=ignore does above."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv])
    return code, capsys.readouterr().err


def tree(root: Path) -> set[str]:
    """Every path under root, hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def bomb_png(path: Path) -> Path:
    """A valid 8x8 PNG whose header then claims 40000x40000 pixels (Pillow refuses it as a decompression bomb)."""
    im.sample_image(16, 16).crop((0, 0, 8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", 40000, 40000) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


def clip_onnx_dir(root: Path, content: str) -> Path:
    """An ONNX folder whose clip stage is `content`: good, corrupted (random bytes) or truncated (half a file)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["h"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["h", "axis"], ["text_embeddings"]),
         helper.make_node("Identity", ["h"], ["pooled_embeddings"])],
        "clip", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 77])],
        [helper.make_tensor_value_info("text_embeddings", TensorProto.FLOAT, ["B", 77, 1]),
         helper.make_tensor_value_info("pooled_embeddings", TensorProto.FLOAT, ["B", 77])],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [2])])
    path = root / "clip" / "model.onnx"
    path.parent.mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    if content == "corrupted":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (root / "manifest.json").write_text('{"format_version": 1, "checkpoint": {"path": "x", "fingerprint": "0"}, '
                                        '"kontext": {}, "tokenizers": {}, "stages": {"clip": {"file": "clip/model.onnx"}}}')
    return root


@pytest.fixture
def place(tmp_path, tiny_ckpt):
    """Inputs every case can point at: a sample image, a 1x1 image, a bomb, a regular file, a folder, bad JSON."""
    im.sample_image(96, 64).save(tmp_path / "in.png")
    im.sample_image(16, 16).resize((1, 1)).save(tmp_path / "one.png")
    bomb_png(tmp_path / "bomb.png")
    (tmp_path / "file.txt").write_text("a regular file\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "array.json").write_text("[1, 2, 3]\n")
    (tmp_path / "notjson.json").write_text("p50: 12 ms\n")
    for content in ("corrupted", "truncated"):
        clip_onnx_dir(tmp_path / content, content)
    (tmp_path / "listmanifest").mkdir()
    (tmp_path / "listmanifest" / "manifest.json").write_text("[]")
    (tmp_path / "nofile").mkdir()
    (tmp_path / "nofile" / "manifest.json").write_text('{"stages": {"clip": {"path": "x.onnx"}}}')
    unreadable = Path(shutil.copytree(tiny_ckpt, tmp_path / "unreadable"))  # root reads anything: a folder stands
    (unreadable / "text_encoder" / "config.json").unlink()  # where the file should be
    (unreadable / "text_encoder" / "config.json").mkdir()
    return tmp_path


EDIT = ("edit", "--model", "{ckpt}", "--prompt", "add a moon", "--steps", "1")
IMG = ("--image", "{tmp}/in.png")
OUT = ("--out", "{tmp}/o.png")
BUILD = ("build", "--sku", "rtx4090", "--out", "{tmp}/engines")

CASES = {
    "guidance-nan": ([*EDIT, *IMG, *OUT, "--guidance", "nan"], "--guidance nan is not a finite number"),
    "guidance-inf": ([*EDIT, *OUT, "--guidance", "inf"], "--guidance inf is not a finite number"),
    "true-cfg-nan": ([*EDIT, *OUT, "--true-cfg", "nan", "--negative-prompt", "blur"], "--true-cfg nan is not a finite"),
    "true-cfg-without-negative": ([*EDIT, *OUT, "--true-cfg", "4"], "--true-cfg 4.0 needs a --negative-prompt"),
    "seed-negative": ([*EDIT, *OUT, "--seed", "-1"], "--seed -1 is outside 0..18446744073709551615"),
    "seed-2**64": ([*EDIT, *OUT, "--seed", str(2**64)], f"--seed {2**64} is outside"),
    "prompt-invalid-utf8": (["edit", "--model", "{ckpt}", "--prompt", b"caf\xe9 au lait", *OUT],
                            "--prompt is not valid UTF-8 text (byte 0xe9)"),
    "negative-invalid-utf8": ([*EDIT, *OUT, "--true-cfg", "2", "--negative-prompt", b"\xff"],
                              "--negative-prompt is not valid UTF-8"),
    "device-tpu": ([*EDIT, *OUT, "--device", "tpu"], "--device tpu: kontext-trt runs on cpu or cuda"),
    "device-mps": ([*EDIT, *OUT, "--device", "mps"], "--device mps: kontext-trt runs on cpu or cuda"),
    "device-meta": ([*EDIT, *OUT, "--device", "meta"], "--device meta: kontext-trt runs on cpu or cuda"),
    "checkpoint-unreadable": (["edit", "--model", "{tmp}/unreadable", "--prompt", "x", *OUT, "--safety-checker", "none"],
                              "unreadable/text_encoder/config.json is unreadable (Is a directory)"),
    "decompression-bomb": ([*EDIT, "--image", "{tmp}/bomb.png", *OUT], "bomb.png is refused as a decompression bomb"),
    "1x1-no-auto-resize": ([*EDIT, "--image", "{tmp}/one.png", "--no-auto-resize", *OUT],
                           "the input image is 1x1: too small to edit at its own size"),
    "edit-out-folder": ([*EDIT, "--out", "{tmp}/folder"], "--out {tmp}/folder is a folder"),
    "edit-out-under-file": ([*EDIT, "--out", "{tmp}/file.txt/o.png"], "{tmp}/file.txt is a file, not a folder"),
    "edit-out-read-only-sys": ([*EDIT, "--out", "/sys/o.png"], "--out /sys/o.png cannot be written (/sys: Permission"),
    "edit-out-read-only-proc": ([*EDIT, "--out", "/proc/o.png"], "--out /proc/o.png cannot be written"),
    "edit-out-gif": ([*EDIT, "--out", "{tmp}/o.gif"], "--out {tmp}/o.gif: the image format comes from the suffix"),
    "synth-out-file": (["synth", "{tmp}/file.txt"], "output folder {tmp}/file.txt is a file, not a folder"),
    "synth-out-under-file": (["synth", "{tmp}/file.txt/ck"], "{tmp}/file.txt is a file, not a folder"),
    "synth-out-read-only": (["synth", "/sys/ck"], "output folder /sys/ck cannot be written"),
    "synth-not-empty": (["synth", "{tmp}/full"], "exists and is not empty; pick a new folder or pass --force"),
    "synth-seed": (["synth", "{tmp}/ck", "--seed", "-5"], "--seed -5 is outside"),
    "synth-text-length": (["synth", "{tmp}/ck", "--text-length", "600"], "text length 600: T5 reads 1 to 512 tokens"),
    "demo-out-file": (["demo", "--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file, not a folder"),
    "demo-out-under-file": (["demo", "--out", "{tmp}/file.txt/demo"], "{tmp}/file.txt is a file, not a folder"),
    "demo-out-read-only": (["demo", "--out", "/sys/demo"], "--out /sys/demo cannot be written"),
    "bench-out-file": (["bench", "run", "--model", "{ckpt}", "--device", "cpu", "--out", "{tmp}/file.txt"],
                       "--out {tmp}/file.txt is a file, not a folder"),
    "bench-out-read-only": (["bench", "run", "--model", "{ckpt}", "--device", "cpu", "--out", "/proc/bench"],
                            "--out /proc/bench cannot be written"),
    "bench-compare-array": (["bench", "compare", "{tmp}/array.json", "{tmp}/array.json"],
                            "array.json holds a JSON list, not an object"),
    "bench-compare-not-json": (["bench", "compare", "{tmp}/notjson.json", "{tmp}/notjson.json"],
                               "notjson.json is not valid JSON"),
    "build-out-file": (["build", "--sku", "rtx4090", "--onnx", "{tmp}/corrupted", "--out", "{tmp}/file.txt"],
                       "--out {tmp}/file.txt is a file, not a folder"),
    "build-out-read-only": (["build", "--sku", "rtx4090", "--onnx", "{tmp}/corrupted", "--out", "/sys/engines"],
                            "--out /sys/engines cannot be written"),
    "build-corrupted-onnx": ([*BUILD, "--onnx", "{tmp}/corrupted"], "corrupted/clip/model.onnx is not a readable ONNX"),
    "build-truncated-onnx": ([*BUILD, "--onnx", "{tmp}/truncated"], "truncated/clip/model.onnx is not a readable ONNX"),
    "build-manifest-array": ([*BUILD, "--onnx", "{tmp}/listmanifest"], "manifest.json holds a JSON list, not an object"),
    "build-manifest-no-file": ([*BUILD, "--onnx", "{tmp}/nofile"], "manifest.json is malformed: 'stages' must map"),
}


# The cases that also run as the installed console script (one per subcommand; the first passes undecodable bytes).
SUBPROCESS = ("prompt-invalid-utf8", "synth-not-empty", "demo-out-read-only", "bench-compare-not-json",
              "build-corrupted-onnx")
RUNS = [pytest.param(case, "in-process", id=case) for case in CASES] + [
    pytest.param(case, "console-script", id=f"{case}-console-script") for case in SUBPROCESS]


@pytest.mark.parametrize("case,how", RUNS)
def test_bad_input_is_one_line_and_exit_2(case, how, place, tiny_ckpt, capsys, monkeypatch):
    argv, expected = CASES[case]
    fill = {"tmp": str(place), "ckpt": str(tiny_ckpt)}
    argv = [a if isinstance(a, bytes) else a.format(**fill) for a in argv]
    before = tree(place)
    if how == "console-script":
        result = console(*argv, cwd=place)
        code, err = result.returncode, result.stderr.decode("utf-8", "replace")
    else:
        monkeypatch.chdir(place)
        code, err = in_process(argv, capsys)
    assert code == 2, err
    lines = err.splitlines()  # progress lines may come first; the error is the last line, and the only one
    assert err.count("error:") == 1 and lines[-1].startswith("error: ") and err.endswith("\n"), err
    assert "Traceback" not in err, err
    assert expected.format(**fill) in err, err
    assert tree(place) == before  # no output, no temp file, no half-made folder
