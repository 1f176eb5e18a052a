"""LoRAs on the split transformer (step caching): the parts carry the same fused weights as the single transformer, so
a LoRA edit with --cache fbcache:0 is the uncached LoRA edit (torch: bit for bit; onnxruntime: within 1e-6, as T = 0
is compared without LoRAs); parts exported without weight maps are refused in one line, never run on base weights."""
import json
import shutil

import numpy as np
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.specs import LoadSpec, parse_cache
from kontext_trt.core.stages import TRANSFORMER_PARTS
from kontext_trt.core.weight_map import OnnxWeights
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.transformer_parts import diffusers_names, transformer_parts

STEPS = 4


def request(cache: str) -> EditRequest:
    return EditRequest(prompts=["make it a watercolor", "add snow"], image=im.sample_image(96, 64, seed=3),
                       steps=STEPS, seed=5, auto_resize=False, cache=parse_cache(cache))


def same_images(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def test_part_names_are_the_models(tiny_ckpt):
    model = ck.load_transformer(ck.open_checkpoint(tiny_ckpt), torch.float32)
    params = dict(model.named_parameters())
    seen = set()
    for name, part in transformer_parts(model).items():
        for own, full in diffusers_names(name, part).items():
            assert dict(part.named_parameters())[own] is params[full], (name, own, full)
            seen.add(full)
    assert seen == set(params)  # the three parts hold every weight of the model, once


def test_exported_parts_carry_weight_maps(tiny_onnx_split):
    """Each part's map names its weights as the model does and reads back the transformer's values."""
    manifest = read_export_manifest(tiny_onnx_split)
    single = manifest.stages["transformer"]
    whole = OnnxWeights(tiny_onnx_split / single["file"], single["weights"])
    union = set()
    for part in TRANSFORMER_PARTS:
        entry = manifest.stages[part]
        assert entry["weights"] and not union & set(entry["weights"])
        union |= set(entry["weights"])
        weights = OnnxWeights(tiny_onnx_split / entry["file"], entry["weights"])
        for name in entry["weights"]:
            assert torch.equal(weights.read(name), whole.read(name)), (part, name)
    assert union == set(single["weights"])
    assert "transformer_blocks.0.attn.to_q.weight" in manifest.stages["transformer_head"]["weights"]
    assert "single_transformer_blocks.1.proj_out.weight" in manifest.stages["transformer_body"]["weights"]


def test_torch_lora_with_a_zero_threshold_cache_is_the_uncached_lora_edit(tiny_ckpt, tiny_loras):
    k = build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32"))
    base = edit(k, request("off"))
    k.set_loras([(tiny_loras["a"], 0.8)])
    off, cached = edit(k, request("off")), edit(k, request("fbcache:0"))
    assert torch.equal(cached.latents, off.latents) and same_images(cached, off)
    assert not torch.equal(off.latents, base.latents)  # the LoRA is on
    assert cached.metadata["cache"]["steps_computed"] == STEPS


def test_onnxruntime_lora_reaches_the_parts(tiny_onnx_split, tiny_loras):
    """The parts are separate ONNX files: each gets the LoRA layers of the weights it holds, from its own map."""
    k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx_split))
    base = edit(k, request("fbcache:0"))
    k.set_loras([(tiny_loras["a"], 0.8)])
    off, cached = edit(k, request("off")), edit(k, request("fbcache:0"))
    assert same_images(cached, off)
    assert (cached.latents - off.latents).abs().max().item() < 1e-6
    assert (cached.latents - base.latents).abs().max().item() > 1e-2  # not the base weights
    overrides = {part: set(k.stages[part].overrides) for part in TRANSFORMER_PARTS}
    # the test LoRA adapts blocks only: the head (block 0) and body get layers, the tail (norm_out, proj_out) none
    assert overrides["transformer_head"] and overrides["transformer_body"] and not overrides["transformer_tail"]
    assert not overrides["transformer_head"] & overrides["transformer_body"]
    assert sum(map(len, overrides.values())) == len(k.stages["transformer"].overrides)
    k.set_loras([])
    assert not any(k.stages[part].overrides for part in TRANSFORMER_PARTS)
    assert torch.equal(edit(k, request("fbcache:0")).latents, base.latents)


def test_parts_without_weight_maps_refuse_the_cached_lora_edit(tiny_onnx_split, tiny_loras, tmp_path):
    """An export whose parts predate their weight maps: the LoRA runs on the single transformer; a cached edit,
    which would run the parts on base weights, is refused in one line."""
    old = tmp_path / "old-export"
    shutil.copytree(tiny_onnx_split, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for part in TRANSFORMER_PARTS:
        del manifest["stages"][part]["weights"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=old, loras=((tiny_loras["a"], 0.8),)))
    assert k.stages["transformer"].overrides and not any(k.stages[p].overrides for p in TRANSFORMER_PARTS)
    assert edit(k, request("off")).latents.shape[0] == 2
    with pytest.raises(KontextError) as info:
        edit(k, request("fbcache:0"))
    message = str(info.value)
    assert "cannot take this pipeline's LoRAs" in message and "re-export the parts" in message
    assert "\n" not in message
    k.set_loras([])  # without LoRAs the parts run as exported
    assert edit(k, request("fbcache:0")).metadata["cache"]["steps_computed"] == STEPS
