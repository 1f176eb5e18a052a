"""Session fixtures shared by all tests: the tiny synthetic checkpoint in both layouts, fully offline."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny preset, seed 0, in the diffusers (HF snapshot) layout."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bfl_ckpt(tmp_path_factory) -> Path:
    """The same weights as BFL single files plus the HF text encoder folders."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bfl", fmt="bfl")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    """All five tiny stages exported once, fp32, opset 23: the folder holding manifest.json (the engines' hook)."""
    from kontext_trt.export.export import export_checkpoint

    return export_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny", dtype="fp32").parent


@pytest.fixture(scope="session")
def tiny_onnx_split(tiny_ckpt, tiny_onnx, tmp_path_factory) -> Path:
    """A copy of tiny_onnx with the transformer's three parts (step caching) exported beside the transformer."""
    import shutil

    from kontext_trt.export.export import export_checkpoint
    from kontext_trt.runtime.stages import TRANSFORMER_PARTS

    out = tmp_path_factory.mktemp("onnx") / "tiny-split"
    shutil.copytree(tiny_onnx, out)
    return export_checkpoint(tiny_ckpt, out, TRANSFORMER_PARTS, dtype="fp32").parent


@pytest.fixture(scope="session")
def slim_ckpt(tmp_path_factory) -> Path:
    """The slim preset (real widths, 1 double + 1 single block, ~1.6 GB on disk), for @pytest.mark.slow tests."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "slim", preset="slim")
