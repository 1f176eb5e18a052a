"""LoRA swaps by refit without a GPU (stand-ins: engines/fake_trt.py, datacenter flavour): streamed in bounded
batches with the weights TensorRT refits together, ordered on torch's current stream, only on refittable weights,
set again after an engine reload, read from the --onnx export when given; the split transformer's parts each refit."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.stages import TRANSFORMER_PARTS
from kontext_trt.core.weight_map import OnnxWeights
from kontext_trt.engines import cache, fake_trt, refit, trt_api, trt_pool
from kontext_trt.engines import trt_stages as ts
from kontext_trt.runtime.flow import Kontext, KontextConfig, PipelineInfo
from kontext_trt.runtime.lora import apply_loras, fused_weights, read_lora

pytest.importorskip("tensorrt_rtx")


class Log(fake_trt.FakeStream):
    """A stream that logs the waits between it and others, and the refits run on it, in order."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events

    def wait_stream(self, stream):
        self.events.append(f"{self.name} waits {stream.name}")


def refittable(engine, entry: dict) -> None:
    """The fake engine takes every mapped weight; each Linear's weight and bias are refit together (a fused GEMM)."""
    inits = {name: w["name"] for name, w in entry["weights"].items()}
    engine._refittable = set(inits.values())
    for name, init in inits.items():
        bias = inits.get(name.removesuffix(".weight") + ".bias") if name.endswith(".weight") else None
        if bias:
            engine._combined[init], engine._combined[bias] = (bias,), (init,)


def engine_folder(tmp_path, manifest: cache.EngineManifest, stages: dict[str, dict]) -> "Path":  # noqa: F821
    """An engine folder whose manifest says these stages were built with --refit from these export entries."""
    folder = tmp_path / "engines"
    folder.mkdir(exist_ok=True)
    entries = {}
    for name, (onnx_path, sha) in stages.items():
        entries[name] = {**manifest.stages.get(name, manifest.stages["transformer"]), "onnx_file": str(onnx_path),
                         "onnx_sha256": sha, "flags": {"refit": True}}
        (folder / f"{name}.plan").write_bytes(b"plan")
    cache.write_manifest(folder, replace(manifest, stages=entries))
    return folder


@pytest.fixture
def setup(tiny_onnx, trt_manifest, fake_engines, tmp_path, monkeypatch):
    """The transformer TrtStage on the datacenter fake, its engine 'built with --refit' from tiny_onnx; stream events
    in .events."""
    trt = fake_trt.fake_tensorrt("10.14.1.48")
    api = trt_api.TrtApi("tensorrt", trt)
    events = []

    class LoggingRefitter(fake_trt.FakeRefitter):
        def refit_cuda_engine_async(self, stream_handle):
            events.append("refit")
            return super().refit_cuda_engine_async(stream_handle)

    trt.Refitter = LoggingRefitter
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Log("current", events))
    export = read_export_manifest(tiny_onnx).stages["transformer"]
    engine = fake_engines.engines["transformer"]
    refittable(engine, export)
    folder = engine_folder(tmp_path, trt_manifest, {"transformer": (tiny_onnx / export["file"], export["sha256"])})
    pool = trt_pool.EnginePool(api, torch.device("cpu"))
    pool.stream = Log("engine", events)
    stage = ts.TrtStage("transformer", folder / "transformer.plan", pool)
    pool.admit(stage)
    weights = OnnxWeights(tiny_onnx / export["file"], export["weights"])
    return stage, engine, weights, events


def expected(weights: OnnxWeights, lora_file, scale: float) -> dict[str, bytes]:
    """The fused LoRA values by initializer, as the refit must hand them over (ONNX layout and dtype)."""
    fused = fused_weights([read_lora(lora_file, scale)], weights.read)
    return {init: fake_trt.host_bytes(value) for init, value in (weights.onnx_value(n, v) for n, v in fused)}


def test_refit_streams_bounded_batches_with_the_weights_refit_together(setup, tiny_loras, monkeypatch):
    stage, engine, weights, events = setup
    monkeypatch.setattr(refit, "REFIT_BATCH_BYTES", 1)  # flush as soon as a batch is complete
    apply_loras(stage.weight_target(), [(tiny_loras["a"], 0.8)])
    lora = expected(weights, tiny_loras["a"], 0.8)
    assert {init: engine._weights[init] for init in lora} == lora  # every LoRA weight refit with its fused value
    partners = {b for init in lora for b in engine._combined.get(init, ()) if b not in lora}
    assert partners and all(engine._weights[b] == fake_trt.host_bytes(weights.read_initializer(b)) for b in partners)
    batches = [names for names, _ in engine._refits]
    assert len(batches) >= len(lora) // 2 and all(stream == 7 for _, stream in engine._refits)
    for names in batches:  # a weight and the bias TensorRT refits with it always go in the same refit
        assert all(set(engine._combined.get(n, ())) <= set(names) for n in names)
    largest = max(sum(len(engine._weights[n]) for n in names) for names in batches)
    assert engine._peak_staged == largest < sum(map(len, lora.values())) / 4  # never the whole set at once
    # each refit runs on the engine stream after torch's queued work, and torch's stream waits for it
    assert events[:3] == ["engine waits current", "refit", "current waits engine"]
    assert events.count("refit") == len(batches) and events == ["engine waits current", "refit",
                                                                "current waits engine"] * len(batches)


def test_swapping_back_restores_the_exported_values(setup, tiny_loras):
    stage, engine, weights, _ = setup
    target = stage.weight_target()
    apply_loras(target, [(tiny_loras["a"], 0.8)])
    changed = set(target.changed)
    apply_loras(target, [])
    assert target.changed == set() and changed
    assert all(engine._weights[init] == fake_trt.host_bytes(weights.read_initializer(init)) for init in changed)


def test_only_refittable_weights_are_offered(setup, tiny_loras):
    """A mapped weight the engine cannot refit is not offered: a LoRA on it is refused in one line, before any
    refit."""
    stage, engine, weights, _ = setup
    name = "transformer_blocks.0.attn.to_q.weight"
    engine._refittable.discard(weights.map[name]["name"])
    target = stage.weight_target()
    assert name not in target.weight_shapes() and len(target.weight_shapes()) == len(weights.map) - 1
    with pytest.raises(KontextError, match="targets transformer_blocks.0.attn.to_q, which this checkpoint's "
                                           r"transformer does not have \(or cannot swap\)"):
        apply_loras(target, [(tiny_loras["a"], 0.8)])
    assert engine._refits == []


def test_a_reloaded_engine_gets_its_lora_again(setup, tiny_loras):
    """The pool frees the engine (out of memory while growing the scratch, another engine set): the plan loads
    afresh with its exported weights, and the LoRA set goes back on before it runs."""
    stage, engine, weights, _ = setup
    apply_loras(stage.weight_target(), [(tiny_loras["a"], 0.8)])
    stage.pool.release()
    engine._weights.clear()  # what a fresh deserialization holds: the plan's own weights
    stage.pool.admit(stage)
    assert {init: engine._weights[init] for init in expected(weights, tiny_loras["a"], 0.8)} == \
        expected(weights, tiny_loras["a"], 0.8)


def test_refit_reads_the_export_given_with_onnx(setup, tiny_onnx, tmp_path):
    stage, _, _, _ = setup
    moved = tmp_path / "moved-export"
    shutil.copytree(tiny_onnx, moved)
    manifest = cache.read_engine_manifest(stage.plan.parent)
    manifest.stages["transformer"]["onnx_file"] = str(tmp_path / "gone" / "transformer" / "model.onnx")
    cache.write_manifest(stage.plan.parent, manifest)
    with pytest.raises(KontextError, match="is not there, and LoRA swaps read its weight map.*--onnx DIR"):
        stage.weight_target()
    stage.onnx_dir = moved
    assert stage.weight_target().onnx.path == moved / "transformer" / "model.onnx"
    other = tmp_path / "other-export"
    shutil.copytree(tiny_onnx, other)
    data = json.loads((other / "manifest.json").read_text())
    data["stages"]["transformer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(data))
    stage.weights_target, stage.onnx_dir = None, other
    with pytest.raises(KontextError, match="holds no transformer export the engine .* was built from"):
        stage.weight_target()


def test_split_engines_refit_every_part(tiny_onnx_split, trt_manifest, fake_engines, make_rtx_engine, tiny_loras,
                                        tmp_path, monkeypatch):
    """Engines of the transformer's parts (step caching), built with --refit: a LoRA set on the pipeline reaches
    each part by its own weight map; no KeyError for the missing single transformer."""
    api = trt_api.TrtApi("tensorrt", fake_trt.fake_tensorrt("10.14.1.48"))
    export = read_export_manifest(tiny_onnx_split).stages
    engines, stages = {}, {}
    for part in TRANSFORMER_PARTS:
        onnx_path = tiny_onnx_split / export[part]["file"]
        profile = {name: {"min": [1] * len(v["shape"]), "opt": [1] * len(v["shape"]), "max": [2] * len(v["shape"])}
                   for name, v in ((i["name"], i) for i in export[part]["inputs"])}
        engines[part] = make_rtx_engine(onnx_path, {"profile": profile})
        refittable(engines[part], export[part])
    folder = engine_folder(tmp_path, trt_manifest, {p: (tiny_onnx_split / export[p]["file"], export[p]["sha256"])
                                                     for p in TRANSFORMER_PARTS})
    monkeypatch.setattr(trt_api, "load_engine", lambda api, path: engines[path.stem])
    pool = trt_pool.EnginePool(api, torch.device("cpu"))
    pool.stream = fake_trt.FakeStream()
    for part in TRANSFORMER_PARTS:
        stages[part] = ts.TrtStage(part, folder / f"{part}.plan", pool)
        pool.admit(stages[part])
    k = Kontext(stages, None, None, KontextConfig(), torch.device("cpu"), PipelineInfo("tensorrt", "fp32", "fp32",
                                                                                        None, str(folder)))
    k.set_loras([(tiny_loras["a"], 0.8)])
    assert k.info.loras == ({"file": "pytorch_lora_weights.safetensors", "scale": 0.8},) and k.lora_refusal is None
    lora = fused_weights([read_lora(tiny_loras["a"], 0.8)], lambda name: None).names
    reached = set()
    for part in TRANSFORMER_PARTS:
        weights = OnnxWeights(tiny_onnx_split / export[part]["file"], export[part]["weights"])
        own = [name for name in lora if name in weights.map]
        assert all(engines[part]._weights[weights.map[name]["name"]] for name in own)
        reached |= set(own)
    assert reached == set(lora) and not engines["transformer_tail"]._refits  # the test LoRA adapts blocks only
    assert engines["transformer_head"]._refits and engines["transformer_body"]._refits


def test_split_engines_built_without_refit_refuse_in_one_line(tiny_onnx_split, trt_manifest, fake_engines, tiny_loras,
                                                        tmp_path):
    export = read_export_manifest(tiny_onnx_split).stages
    folder = engine_folder(tmp_path, trt_manifest, {p: (tiny_onnx_split / export[p]["file"], export[p]["sha256"])
                                                     for p in TRANSFORMER_PARTS})
    manifest = cache.read_engine_manifest(folder)
    for part in TRANSFORMER_PARTS:  # built without --refit
        manifest.stages[part]["flags"]["refit"] = False
    cache.write_manifest(folder, manifest)
    pool = trt_pool.EnginePool(trt_api.TrtApi("tensorrt", fake_trt.fake_tensorrt("10.14.1.48")), torch.device("cpu"))
    stages = {part: ts.TrtStage(part, folder / f"{part}.plan", pool) for part in TRANSFORMER_PARTS}
    k = Kontext(stages, None, None, KontextConfig(), torch.device("cpu"), PipelineInfo("tensorrt", "fp32", "fp32",
                                                                                        None, str(folder)))
    with pytest.raises(KontextError) as info:
        k.set_loras([(tiny_loras["a"], 0.8)])
    assert "transformer_head.plan was built without --refit" in str(info.value) and "\n" not in str(info.value)
