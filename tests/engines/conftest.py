"""Engine-test fixtures: tiny ONNX stages and one TensorRT-RTX build of them per session (CPU-only AOT)."""
from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest
import torch

from kontext_trt.cli.main import main

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
    """ENGINES root after `kontext-trt build` of all five tiny stages for the RTX 4090 (sm89) on this CPU host."""
    def make() -> Path:
        root = tmp_path_factory.mktemp("engines")
        assert main(["build", "--onnx", str(engine_onnx), "--out", str(root), "--sku", "rtx4090"]) == 0
        return root
    return once("built", make)


@pytest.fixture
def fake_tensorrt():
    """Makes stand-in `tensorrt` modules: fake_tensorrt("10.14.1.48"), fake_tensorrt("11.1.0.5")."""
    return make_fake_tensorrt


def make_fake_tensorrt(version: str) -> types.ModuleType:
    """A stand-in `tensorrt` module of a given version with the builder surface engines/ uses, recording what the
    build asks of it. TensorRT 11 has no STRONGLY_TYPED creation flag and no precision builder flags (its networks
    are always strongly typed), as in its Python API; TensorRT 10 has both."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt11 = int(version.split(".")[0]) >= 11
    flags = ["TF32", "REFIT", "WEIGHT_STREAMING"] + ([] if trt11 else ["FP16", "BF16", "INT8", "FP8"])
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**({} if trt11 else {"STRONGLY_TYPED": 5}))
    trt.LayerType = types.SimpleNamespace(ATTENTION_OUTPUT="attention")
    trt.calls = []

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2})

        def __init__(self) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class Config:
        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag.name))

        def clear_flag(self, flag):
            trt.calls.append(("clear_flag", flag.name))

        def add_optimization_profile(self, profile):
            trt.calls.append(("profile", dict(profile.shapes)))

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags):
            trt.calls.append(("create_network", flags))
            return types.SimpleNamespace(num_layers=0)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return memoryview(b"plan")

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.num_errors = 0

        def parse_from_file(self, path):
            trt.calls.append(("parse", path))
            return True

    trt.ILogger, trt.IProgressMonitor, trt.Builder, trt.OnnxParser = ILogger, IProgressMonitor, Builder, OnnxParser
    return trt


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
