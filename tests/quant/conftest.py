"""Quantization fixtures: a small calibration JSONL and one FP8, one NVFP4 (SVDQuant rank 32, the default) and one
plain NVFP4 (--svd-rank 0) `kontext-trt quantize` of the tiny checkpoint (2 edits of 2 steps, a 1-edit report,
auto-resize off), each run once per session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kontext_trt.cli.main import main
from kontext_trt.core.image import sample_image

QUICK = ["--calib-size", "2", "--calib-steps", "2", "--report-size", "1", "--no-auto-resize"]


@pytest.fixture(scope="session")
def calib_jsonl(once, tmp_path_factory) -> Path:
    """Two drawn 128x96 / 96x128 images with instructions, as a JSONL file beside them."""
    return once("calib_jsonl", lambda: write_calib(tmp_path_factory.mktemp("calib")))


def write_calib(folder: Path) -> Path:
    """The files of calib_jsonl, written in folder."""
    lines = []
    for i, ((w, h), prompt) in enumerate((((128, 96), "Add snow on the roof of the house."),
                                          ((96, 128), "Transform this photo into a watercolor painting."))):
        sample_image(w, h, seed=50 + i).save(folder / f"scene{i}.png")
        lines.append(json.dumps({"image": f"scene{i}.png", "prompt": prompt}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def quantize_once(tmp_path_factory, tiny_ckpt, calib_jsonl, name: str, *args: str) -> tuple[Path, str]:
    """Run `kontext-trt quantize` into a fresh folder; (the folder, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp(name) / "q"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["quantize", "--model", str(tiny_ckpt), "--out", str(out), "--calib", str(calib_jsonl), *QUICK,
                     *args])
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="session")
def fp8_run(once, tmp_path_factory, tiny_ckpt, calib_jsonl) -> tuple[Path, str]:
    """FP8 with FP8 attention, exported in fp32 (ONNX Runtime runs it; TensorRT-RTX builds it for sm89)."""
    return once("fp8_run", lambda: quantize_once(tmp_path_factory, tiny_ckpt, calib_jsonl, "fp8", "--precision", "fp8",
                                                 "--attention", "fp8", "--dtype", "fp32"))


@pytest.fixture(scope="session")
def nvfp4_run(once, tmp_path_factory, tiny_ckpt, calib_jsonl) -> tuple[Path, str]:
    """NVFP4 with SVDQuant rank 32 and its default FP8 attention, exported in bf16 (TensorRT-RTX builds it for sm120)."""
    return once("nvfp4_run", lambda: quantize_once(tmp_path_factory, tiny_ckpt, calib_jsonl, "nvfp4", "--precision",
                                                   "nvfp4"))


@pytest.fixture(scope="session")
def nvfp4_plain_run(once, tmp_path_factory, tiny_ckpt, calib_jsonl) -> tuple[Path, str]:
    """Plain NVFP4 (--svd-rank 0) with its default FP8 attention, exported in bf16."""
    return once("nvfp4_plain_run", lambda: quantize_once(tmp_path_factory, tiny_ckpt, calib_jsonl, "nvfp4_plain",
                                                         "--precision", "nvfp4", "--svd-rank", "0"))


@pytest.fixture(scope="session")
def quantize_run(tmp_path_factory, calib_jsonl):
    """quantize_once for any checkpoint: quantize_run(ckpt, name, *args) -> (folder, printed)."""
    return lambda ckpt, name, *args: quantize_once(tmp_path_factory, ckpt, calib_jsonl, name, *args)
