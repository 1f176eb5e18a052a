"""`kontext-trt check` on this host: the comparison, fp32 and bf16 stages against ONNX Runtime (an ONNX Runtime
stand-in runs the engine: tests/engines/conftest.py), and the fp32 reference copy of a bf16 graph."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.engines import build, cache, check, onnx_cast, trt_api
from kontext_trt.engines.profiles import Shapes
from kontext_trt.engines.skus import SKUS

RTX = trt_api.load_api("tensorrt-rtx")


def test_compare():
    ref = {"y": np.array([1.0, -2.0, 0.0], np.float32)}
    (row,) = check.compare(ref, {"y": np.array([1.0, -2.0, 0.0], np.float32)}, atol=1e-3, rtol=1e-3)
    assert row == {"output": "y", "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "passed": True}
    (row,) = check.compare(ref, {"y": np.array([1.01, -2.0, 0.005], np.float32)}, atol=1e-3, rtol=2e-2)
    assert not row["passed"] and row["max_abs"] == pytest.approx(0.01) and row["max_rel"] > 1  # 0.005 vs 0
    assert check.compare(ref, {}, 1, 1) == [{"output": "y", "error": "the engine has no such output"}]


def test_check_fp32_set(built, engine_onnx, ort_engines):
    """check_engines feeds each engine its opt shapes in its dtypes; the stand-in engine is exact here."""
    onnx_dir = read_onnx_dir(engine_onnx)
    runners = ort_engines(onnx_dir)
    found = cache.open_set(built / "rtx4090-sm89" / RTX.folder / "fp32")
    subset = cache.Engines(found.folder, found.manifest, {s: found.plans[s] for s in ("clip", "t5")}, None)
    rows = check.check_engines(subset, onnx_dir, RTX)
    assert [(r["stage"], r["output"], r["max_abs"], r["passed"]) for r in rows] == [
        ("clip", "text_embeddings", 0.0, True), ("clip", "pooled_embeddings", 0.0, True),
        ("t5", "text_embeddings", 0.0, True)]
    assert runners[0].feeds[0]["input_ids"].dtype == torch.int64 and runners[0].feeds[0]["input_ids"].shape == (1, 77)
    assert "t5           text_embeddings" in check.format_rows(rows)


def test_check_bf16_set(bf16_onnx, tmp_path, ort_engines):
    """bf16 engines get bf16 inputs; the reference is the same graph in fp32 (ONNX Runtime's CPU kernels have no bf16
    MatMul, Conv or Resize, and numpy no bfloat16): every output is within bf16 rounding of it."""
    folder, _ = build.build_set(build.BuildRequest(
        onnx_dir=bf16_onnx, out=tmp_path, sku=SKUS["rtx4090"], target=build.Target("tensorrt-rtx", (89,)),
        shapes=Shapes(((64, 64),)), stages=("t5", "vae_decoder", "transformer")))
    onnx_dir = read_onnx_dir(bf16_onnx)
    runners = ort_engines(onnx_dir, torch.bfloat16)
    rows = check.check_engines(cache.open_set(folder), onnx_dir, RTX, atol=5e-2, rtol=2e-2)
    assert [(r["stage"], r["output"]) for r in rows] == [
        ("t5", "text_embeddings"), ("transformer", "latent"), ("vae_decoder", "images")], rows
    assert all(r["passed"] and 0 < r["max_rel"] < 1e-2 for r in rows), check.format_rows(rows)  # bf16 rounding
    transformer_feed = runners[1].feeds[0]
    assert transformer_feed["hidden_states"].dtype == torch.bfloat16 and transformer_feed["timestep"].dtype == \
        torch.bfloat16


def test_fp32_copy_of_a_bf16_graph(bf16_onnx, engine_onnx):
    path = read_onnx_dir(bf16_onnx).pick("vae_decoder", None).path
    with onnx_cast.fp32_copy(path) as copy:
        model = onnx.load(str(copy))
        assert copy != path and not onnx_cast.has_type(model, TensorProto.BFLOAT16)
        assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT}
    assert not copy.exists()  # a temporary copy
    fp32 = read_onnx_dir(engine_onnx).pick("vae_decoder", None).path
    with onnx_cast.fp32_copy(fp32) as same:
        assert same == fp32  # nothing to convert: the file itself
