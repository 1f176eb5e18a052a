"""Tiny FLUX.2 [klein] checkpoints (distilled and base), made once per run (tests/klein/tiny_klein.py), the
distilled one's export and its TensorRT-RTX engines."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_klein import write_tiny_klein  # noqa: E402


@pytest.fixture(scope="session")
def klein_distilled(once, tmp_path_factory) -> Path:
    return once("klein_distilled", lambda: write_tiny_klein(tmp_path_factory.mktemp("klein") / "distilled", True, 1))


@pytest.fixture(scope="session")
def klein_base(once, tmp_path_factory) -> Path:
    return once("klein_base", lambda: write_tiny_klein(tmp_path_factory.mktemp("klein") / "base", False, 2))


@pytest.fixture(scope="session")
def klein_onnx(once, klein_distilled, tmp_path_factory) -> Path:
    """The four stages of klein_distilled exported once, fp32: the folder holding manifest.json."""
    from kontext_trt.export.export import export_checkpoint

    return once("klein_onnx", lambda: export_checkpoint(klein_distilled, tmp_path_factory.mktemp("onnx") / "klein",
                                                        dtype="fp32").parent)


@pytest.fixture(scope="session")
def klein_engines(once, klein_onnx, tmp_path_factory) -> Path:
    """ENGINES root with klein_onnx's four stages built once on this CPU host for the RTX 4090 (sm89), fp32, sizes
    64x64 and 96x64 (16 and 24 tokens), batch 1-2: `kontext-trt build` as a user runs it."""
    pytest.importorskip("tensorrt_rtx")
    from kontext_trt.cli.main import main
    from kontext_trt.engines import device

    def make() -> Path:
        root = tmp_path_factory.mktemp("klein-engines")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(device, "detect_gpu", lambda cuda_index=None: (None, "built ahead of time for the tests"))
            assert main(["build", "--onnx", str(klein_onnx), "--out", str(root), "--sku", "rtx4090", "--sizes",
                         "64x64,96x64", "--batch", "1-2"]) == 0
        return root
    return once("klein_engines", make)
