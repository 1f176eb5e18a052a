"""Tiny FLUX.2 [klein] checkpoints (distilled and base), made once per run (tests/klein/tiny_klein.py)."""
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
