"""engines.trt_api: the version floor, TensorRT 10 vs 11 build rules (on stand-in modules), attention decomposition
and build progress (real TensorRT-RTX builds on this CPU host)."""
import importlib
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from kontext_trt.core.errors import KontextError
from kontext_trt.engines import build, trt_api

PROFILE = {"input_ids": ((1, 77), (1, 77), (2, 77))}


@pytest.mark.parametrize("version,ok", [("10.8.0.43", False), ("10.13.3.9", False), ("10.14.1.48", True),
                                        ("11.1.0.5", True)])
def test_tensorrt_version_floor(fake_tensorrt, monkeypatch, version, ok):
    """TensorRT's ONNX parser takes the exports' Attention op (opset 23) from 10.14 on: older ones are refused."""
    monkeypatch.setattr(importlib, "import_module", lambda name: fake_tensorrt(version))
    if ok:
        assert trt_api.load_api.__wrapped__("tensorrt").version == version
    else:
        with pytest.raises(KontextError, match=rf"tensorrt {version} is older than 10.14.*kontext-trt\[trt\]"):
            trt_api.load_api.__wrapped__("tensorrt")


def test_trt10_and_trt11_build_rules(fake_tensorrt):
    trt10, trt11 = (trt_api.TrtApi("tensorrt", fake_tensorrt(v)) for v in ("10.14.1.48", "11.1.0.5"))
    rtx = trt_api.load_api("tensorrt-rtx")
    assert not trt10.strongly_typed_only and trt11.strongly_typed_only and not rtx.strongly_typed_only
    assert trt_api.build_rules(trt10).network_flags == 1 << 5  # STRONGLY_TYPED asked for
    assert trt_api.build_rules(trt11).network_flags == 0  # always strongly typed: the flag is deprecated
    assert trt_api.build_rules(rtx).network_flags == 1 << int(rtx.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    for api in (trt10, trt11):
        rules = trt_api.build_rules(api)
        assert [f.name for f in rules.cleared_flags] == ["TF32"] and rules.set_flags == ()
    assert [f.name for f in trt_api.build_rules(rtx).set_flags] == ["REQUIRE_USER_ALLOCATION"]
    assert trt_api.build_rules(rtx, weight_streaming=True).set_flags == ()


@pytest.mark.parametrize("version", ["10.14.1.48", "11.1.0.5"])
def test_build_path_runs_on_trt10_and_trt11(fake_tensorrt, monkeypatch, tmp_path, version):
    """build_engine end to end on a stand-in module: the network flags each version wants, no precision flags,
    TF32 cleared, the profile set; TensorRT 11's fake has no STRONGLY_TYPED (deprecated) or FP16/BF16 to touch."""
    trt = fake_tensorrt(version)
    api = trt_api.TrtApi("tensorrt", trt)
    monkeypatch.setattr(trt_api, "load_api", lambda flavor: api)
    flags = build.BuildFlags(weight_streaming=True)  # refit: tests/engines/test_refit.py (it needs an export's map)
    plan = build.build_engine(tmp_path / "clip.onnx", PROFILE, build.Target("tensorrt", (90,), 90), flags)
    assert bytes(plan) == b"plan"
    assert trt._calls[0] == ("create_network", 0 if version.startswith("11") else 1 << 5)
    assert ("clear_flag", "TF32") in trt._calls and ("set_flag", "WEIGHT_STREAMING") in trt._calls
    assert not {name for kind, name in trt._calls if kind == "set_flag"} & {"FP16", "BF16", "INT8", "FP8"}
    assert ("profile", PROFILE) in trt._calls


def attention_onnx(path: Path, dtype: int, head: int) -> Path:
    """One ONNX Attention op (opset 23) over (B, 2 heads, S, head) tensors."""
    io = [helper.make_tensor_value_info(n, dtype, ["B", 2, "S", head]) for n in ("q", "k", "v", "y")]
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"])], "attention", io[:3], io[3:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), path)
    return path


@pytest.mark.parametrize("dtype", [TensorProto.BFLOAT16, TensorProto.FLOAT])
def test_small_head_attention_builds_in_every_precision(tmp_path, dtype):
    """TensorRT-RTX 1.7 has no fused kernel for head size 8 (nor fp32 attention): the op must be decomposable."""
    path = attention_onnx(tmp_path / "attention.onnx", dtype, head=8)
    profile = {n: ((1, 2, 16, 8), (1, 2, 64, 8), (2, 2, 128, 8)) for n in "qkv"}
    plan = build.build_engine(path, profile, build.Target("tensorrt-rtx", (89,)))
    assert trt_api.rtx_header(plan)[1] == (89,)


def test_build_progress_through_the_progress_monitor(tmp_path, monkeypatch):
    """The builder reports its phases to trt_api.progress_monitor (tqdm bars), and every bar is closed."""
    made = []
    real = trt_api.progress_monitor
    monkeypatch.setattr(trt_api, "progress_monitor", lambda api: made.append(real(api)) or made[-1])
    path = attention_onnx(tmp_path / "attention.onnx", TensorProto.FLOAT, head=8)
    build.build_engine(path, {n: ((1, 2, 16, 8),) * 3 for n in "qkv"}, build.Target("tensorrt-rtx", (89,)))
    assert made[0].phases >= 1 and made[0].bars == {}
