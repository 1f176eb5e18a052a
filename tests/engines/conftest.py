"""Engine-test fixtures: tiny ONNX stages and one TensorRT-RTX build of them per session (CPU-only AOT)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kontext_trt.runtime.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import proto_onnx  # noqa: E402

pytest.importorskip("tensorrt_rtx")


@pytest.fixture(scope="session")
def engine_onnx(request, tmp_path_factory) -> Path:
    """The tiny fp32 ONNX stages: export/'s `tiny_onnx` once it exists, else the stand-in from proto_onnx."""
    try:
        return Path(request.getfixturevalue("tiny_onnx"))
    except pytest.FixtureLookupError:
        return proto_onnx.export(tmp_path_factory.mktemp("onnx_fp32"))


@pytest.fixture(scope="session")
def bf16_onnx(tmp_path_factory) -> Path:
    """The stand-in stages exported in bf16 (strongly typed: a bf16 engine)."""
    return proto_onnx.export(tmp_path_factory.mktemp("onnx_bf16"), torch.bfloat16)


@pytest.fixture(scope="session")
def built(engine_onnx, tmp_path_factory) -> Path:
    """ENGINES root after `kontext-trt build` of all five tiny stages for the RTX 4090 (sm89) on this CPU host."""
    root = tmp_path_factory.mktemp("engines")
    assert main(["build", "--onnx", str(engine_onnx), "--out", str(root), "--sku", "rtx4090"]) == 0
    return root
