"""Engine-test fixtures: tiny ONNX stages and one TensorRT-RTX build of them per session (CPU-only AOT)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kontext_trt.cli.main import main
from kontext_trt.engines import fake_trt

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
def bf16_onnx(once, tmp_path_factory) -> Path:
    """The stand-in stages exported in bf16 (strongly typed: a bf16 engine)."""
    return once("bf16_onnx", lambda: proto_onnx.export(tmp_path_factory.mktemp("onnx_bf16"), torch.bfloat16))


@pytest.fixture(scope="session")
def built(once, engine_onnx, tmp_path_factory) -> Path:
    """ENGINES root after `kontext-trt build` of all five tiny stages for the RTX 4090 (sm89), ahead of time as on a
    host without a GPU (on a GPU host too: a datacenter GPU could not load these RTX plans to check them)."""
    from kontext_trt.engines import device

    def make() -> Path:
        root = tmp_path_factory.mktemp("engines")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(device, "detect_gpu", lambda cuda_index=None: (None, "built ahead of time for the tests"))
            assert main(["build", "--onnx", str(engine_onnx), "--out", str(root), "--sku", "rtx4090"]) == 0
        return root
    return once("built", make)


@pytest.fixture
def fake_tensorrt():
    """Makes stand-in datacenter `tensorrt` modules (kontext_trt/engines/fake_trt.py): fake_tensorrt("10.14.1.48"),
    fake_tensorrt("11.1.0.5")."""
    return fake_trt.fake_tensorrt


class OrtAsEngine:
    """polygraphy TrtRunner's surface over ONNX Runtime, standing in for an engine this host cannot run: torch inputs
    in the engine's dtypes in, torch outputs in `dtype` out (bf16 for a bf16 engine: the fp32 graph's outputs
    rounded, as a bf16 engine's are)."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.path, self.dtype, self.feeds = path, dtype, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def infer(self, feed):
        from kontext_trt.engines import check

        self.feeds.append(feed)
        return {name: torch.from_numpy(out).to(self.dtype) for name, out in check.onnx_outputs(self.path, feed).items()}


@pytest.fixture
def ort_engines(monkeypatch):
    """Plans 'run' as OrtAsEngine over the ONNX of their stage in `onnx` (an OnnxDir), outputs in `dtype`:
    ort_engines(onnx, torch.bfloat16). Returns the runners made."""
    from kontext_trt.engines import check, trt_api

    made = []
    monkeypatch.setattr(check, "PROVIDERS", ["CPUExecutionProvider"])

    def use(onnx, dtype=torch.float32):
        def runner(api, plan):
            made.append(OrtAsEngine(onnx.pick(plan.stem, None).path, dtype))
            return made[-1]
        monkeypatch.setattr(trt_api, "polygraphy_runner", runner)
        return made
    return use
