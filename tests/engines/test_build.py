"""TensorRT-RTX builds of the tiny stages on this CPU host: plans, headers, manifests, resume, atomicity, refusals."""
import os

import onnx
import pytest
from onnx import TensorProto, helper

from kontext_trt.core.errors import KontextError
from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.core.stages import STAGE_NAMES
from kontext_trt.engines import build, cache, trt_api
from kontext_trt.engines.profiles import Shapes
from kontext_trt.engines.skus import SKUS, precision_refusal

RTX = trt_api.load_api("tensorrt-rtx").folder


def test_all_stages_built_with_valid_headers(built):
    folder = built / "rtx4090-sm89" / RTX / "fp32"
    api = trt_api.load_api("tensorrt-rtx")
    for stage in STAGE_NAMES:
        plan = (folder / f"{stage}.plan").read_bytes()
        assert len(plan) > 0
        assert trt_api.rtx_header(plan) == (api.version, (89,))  # version and compute capability targeting took
        assert trt_api.inspect_plan(api, plan, gpu=False)["validity"].startswith("unchecked: the header is well formed")
    assert trt_api.inspect_plan(api, b"\0" * 64, gpu=False)["validity"] == "malformed"


def test_manifest_fields(built, engine_onnx):
    manifest = cache.read_engine_manifest(built / "rtx4090-sm89" / RTX / "fp32")
    assert (manifest.sku, manifest.tag, manifest.flavor, manifest.precision) == \
        ("rtx4090", "rtx4090-sm89", "tensorrt-rtx", "fp32")
    assert manifest.targets == ["sm89"] and manifest.caches == {"runtime": "runtime.cache", "timing": None}
    assert manifest.checkpoint_fingerprint == read_onnx_dir(engine_onnx).fingerprint
    assert manifest.onnx["manifest_sha256"] and manifest.command.startswith("kontext-trt build --onnx")
    assert manifest.tokens["total"] == [4042, 8192, 8300]
    t = manifest.stages["transformer"]
    assert t["profile"]["hidden_states"]["max"][:2] == [1, 8300] and t["axes"]["L"] == [4042, 8192, 8300]
    for entry in manifest.stages.values():
        assert entry["engine_bytes"] > 0 and entry["build_seconds"] > 0 and entry["built_at"]
        assert entry["flags"]["strongly_typed"] and entry["precision"] == "fp32"
        assert entry["device_memory_bytes"] is None and "needs a GPU" in entry["device_memory_note"]
        assert entry["header"] == {"version": manifest.version, "targets": ["sm89"]}


def request(onnx_dir, out, **kw):
    kw.setdefault("stages", ("clip",))
    return build.BuildRequest(onnx_dir=onnx_dir, out=out, sku=SKUS["rtx4090"],
                              target=build.Target("tensorrt-rtx", (89,)), **kw)


def test_second_build_is_a_no_op(built, engine_onnx, monkeypatch):
    folder = built / "rtx4090-sm89" / RTX / "fp32"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    calls = []
    monkeypatch.setattr(build, "build_engine", lambda *a, **k: calls.append(a))
    _, done = build.build_set(request(engine_onnx, built, stages=()))
    assert done == [] and calls == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_interrupted_build_leaves_no_plan(engine_onnx, tmp_path, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt  # Ctrl-C between writing the temporary file and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        build.build_set(request(engine_onnx, tmp_path))
    folder = tmp_path / "rtx4090-sm89" / RTX / "fp32"
    assert sorted(p.name for p in folder.iterdir()) == []  # no plan, no temporary file, no manifest
    monkeypatch.undo()
    (folder / ".clip.plan.999999999.tmp").write_bytes(b"partial")  # left by a build killed with SIGKILL
    _, done = build.build_set(request(engine_onnx, tmp_path))
    assert done == ["clip"] and sorted(p.name for p in folder.iterdir()) == [".kontext-trt.lock", "clip.plan",
                                                                             "manifest.json"]


def test_changed_flags_rebuild(engine_onnx, tmp_path):
    folder, done = build.build_set(request(engine_onnx, tmp_path))
    assert done == ["clip"]
    flags = build.BuildFlags(opt_level=2, weight_streaming=True)
    _, done = build.build_set(request(engine_onnx, tmp_path, flags=flags))
    manifest = cache.read_engine_manifest(folder)
    assert done == ["clip"] and manifest.stages["clip"]["flags"]["opt_level"] == 2
    assert not manifest.stages["clip"]["flags"]["weight_streaming"]  # only the transformer streams its weights
    assert manifest.command.endswith("--batch 1 --opt-level 2 --weight-streaming --stages clip")


def test_bf16_build_for_blackwell_rtx(bf16_onnx, tmp_path):
    req = build.BuildRequest(onnx_dir=bf16_onnx, out=tmp_path, sku=SKUS["rtx5090"],
                             target=build.Target("tensorrt-rtx", (86, 89, 120)),
                             shapes=Shapes(((1024, 1024),), static=True), stages=("transformer", "vae_decoder"),
                             flags=build.BuildFlags(weight_streaming=True))
    folder, done = build.build_set(req)
    assert folder == tmp_path / "rtx5090-sm120" / RTX / "bf16" and done == ["transformer", "vae_decoder"]
    manifest = cache.read_engine_manifest(folder)
    t = manifest.stages["transformer"]
    assert t["precision"] == "bf16" and t["inputs"]["hidden_states"]["dtype"] == "bfloat16"
    assert t["profile"]["hidden_states"]["min"] == t["profile"]["hidden_states"]["max"] == [1, 8192, 64]
    assert t["header"]["targets"] == ["sm86", "sm89", "sm120"]  # one portable plan for three GPUs
    assert "--static 1024x1024" in manifest.command
    assert t["flags"]["weight_streaming"] and not manifest.stages["vae_decoder"]["flags"]["weight_streaming"]


@pytest.mark.parametrize("precision,sm,ok", [
    ("fp32", 75, True), ("bf16", 75, False), ("bf16", 80, True), ("bf16", 86, True),
    ("fp8", 86, False), ("fp8", 89, True), ("fp8", 90, True), ("fp8", 120, True),
    ("nvfp4", 89, False), ("nvfp4", 90, False), ("nvfp4", 100, True), ("nvfp4", 120, True),
])
def test_precision_refusal_table(precision, sm, ok):
    reason = precision_refusal(precision, sm)
    assert (reason is None) == ok
    if not ok:
        assert "\n" not in reason and f"sm{sm}" in reason and precision in reason


def test_fp8_onnx_refused_below_ada_before_building(tmp_path):
    """Precision is read from the graph (a ModelOpt FP8 Q/DQ node) and refused for sm86 with one line."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 512])
    y = helper.make_tensor_value_info("text_embeddings", TensorProto.FLOAT, ["B", 512, 8])
    nodes = [helper.make_node("TRT_FP8QuantizeLinear", ["input_ids"], ["q"], domain="trt"),
             helper.make_node("Identity", ["q"], ["text_embeddings"])]
    model = helper.make_model(helper.make_graph(nodes, "t5", [x], [y]))
    (tmp_path / "t5").mkdir()
    onnx.save(model, tmp_path / "t5" / "model.onnx")
    assert read_onnx_dir(tmp_path).stages["t5"]["fp8"].precision == "fp8"
    req = build.BuildRequest(onnx_dir=tmp_path, out=tmp_path / "e", sku=SKUS["rtx4090"],
                             target=build.Target("tensorrt-rtx", (86, 89)))
    with pytest.raises(KontextError, match=r"t5 ONNX .* is fp8: fp8 needs compute capability sm89 \(Ada\) .* sm86"):
        build.build_set(req)
    assert not (tmp_path / "e").exists()


def test_target_refusals(engine_onnx, tmp_path):
    with pytest.raises(KontextError, match="cannot target sm90"):
        build.build_set(build.BuildRequest(onnx_dir=engine_onnx, out=tmp_path, sku=SKUS["h100-sxm"],
                                           target=build.Target("tensorrt-rtx", (90,))))
    rtx = trt_api.load_api("tensorrt-rtx")
    with pytest.raises(KontextError, match="no GPU is present"):
        trt_api.check_targets(trt_api.TrtApi("tensorrt", rtx.trt), (90,), None)
    with pytest.raises(KontextError, match="only for the GPU present"):
        trt_api.check_targets(trt_api.TrtApi("tensorrt", rtx.trt), (90,), 89)


def test_build_engine_plain_function(engine_onnx):
    """build_engine is usable on its own: one ONNX, one profile, one target -> plan bytes."""
    t5 = read_onnx_dir(engine_onnx).pick("t5", None)
    plan = build.build_engine(t5.path, {"input_ids": ((1, 512), (1, 512), (2, 512))},
                              build.Target("tensorrt-rtx", (120,)))
    assert trt_api.rtx_header(plan)[1] == (120,)
