"""Step caching (fbcache, teacache) over the split transformer: spec parsing, the policies' decisions, the split parts
against the single transformer (torch: bit-identical; onnxruntime: 1e-5), T = 0 giving the uncached edit bit for bit,
a huge T computing only the protected steps, true CFG, and the one-line refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import TEACACHE_FLUX, CacheSpec, LoadSpec, parse_cache
from kontext_trt.core.stages import STAGE_IO, TRANSFORMER_PARTS
from kontext_trt.core.timing import StageTimes
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.step_cache import FirstBlockCache, TeaCache, relative_l1

STEPS = 6


@pytest.fixture(scope="module")
def torch_k(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32"))


@pytest.fixture(scope="module")
def ort_k(tiny_onnx_split):
    return build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx_split))


def request(cache: str, prompts=("add a cat",), steps=STEPS, **kw) -> EditRequest:
    return EditRequest(prompts=list(prompts), image=im.sample_image(96, 64, seed=3), steps=steps, seed=5,
                       auto_resize=False, cache=parse_cache(cache), **kw)


def transformer_inputs(config: dict, batch=2, tokens=40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(batch, tokens, config["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(batch, 512, config["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=g),
            "timestep": torch.tensor([0.7, 0.3]), "img_ids": torch.randint(0, 8, (tokens, 3)).float(),
            "txt_ids": torch.zeros(512, 3), "guidance": torch.full((batch,), 2.5)}


def composed(k, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    head = k.stages["transformer_head"](**inputs)
    body = k.stages["transformer_body"](**{n: head[n] for n in STAGE_IO["transformer_body"][0] if n in head},
                                        img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])
    return k.stages["transformer_tail"](final_hidden_states=body["final_hidden_states"], temb=head["temb"])["latent"]


@pytest.mark.parametrize("text,want", [
    ("off", CacheSpec()),
    ("fbcache", CacheSpec("fbcache", 0.12)),
    ("teacache", CacheSpec("teacache", 0.4)),
    ("FBCache:0.2", CacheSpec("fbcache", 0.2)),
    ("teacache:0.6,warmup=2,cooldown=3", CacheSpec("teacache", 0.6, 2, 3)),
    ("teacache:0.25,coefficients=1/0/0.5", CacheSpec("teacache", 0.25, coefficients=(1.0, 0.0, 0.5))),
])
def test_parse_cache(text, want):
    spec = parse_cache(text)
    assert spec == want
    assert parse_cache(str(spec)) == spec  # the report's spec string reads back


@pytest.mark.parametrize("text,message", [
    ("lru:0.1", "unknown policy 'lru'"), ("fbcache:abc", "not a number"), ("fbcache:-1", "threshold must be >= 0"),
    ("fbcache:0.1,warmup=0", "warmup, cooldown >= 1"), ("fbcache:0.1,depth=2", "unknown option 'depth'"),
    ("off:0.1", "off takes no threshold"),
])
def test_parse_cache_refuses(text, message):
    with pytest.raises(KontextError, match=message):
        parse_cache(text)


def test_first_block_cache_compares_with_the_last_computed_step():
    policy = FirstBlockCache(0.1)
    r0 = torch.ones(1, 4, 8)
    assert policy.decide({"first_block_residual": r0}, protected=True)
    assert not policy.decide({"first_block_residual": r0 * 1.05}, protected=False)  # 5% change
    assert not policy.decide({"first_block_residual": r0 * 1.09}, protected=False)  # still vs r0: 9%
    assert policy.decide({"first_block_residual": r0 * 1.11}, protected=False)  # 11% >= 10%: computed, new reference
    assert not policy.decide({"first_block_residual": r0 * 1.15}, protected=False)  # vs 1.11: 3.6%


def test_teacache_accumulates_the_rescaled_change():
    rescale = np.poly1d(TEACACHE_FLUX)
    policy = TeaCache(0.5, TEACACHE_FLUX)
    m = torch.ones(1, 4, 8)
    assert policy.decide({"modulated_input": m}, protected=True)
    step = rescale(0.02)  # ~0.23 per step of a 2% change: skip, skip (0.46), compute (0.69 >= 0.5)
    decisions = [policy.decide({"modulated_input": m * 1.02 ** i}, protected=False) for i in range(1, 4)]
    assert decisions == [False, False, True] and 2 * step < 0.5 <= 3 * step
    assert policy.accumulated == 0.0
    assert relative_l1(m * 1.02, m) == pytest.approx(0.02, rel=1e-5)


def test_torch_parts_are_the_single_transformer_bit_for_bit(torch_k, tiny_ckpt):
    inputs = transformer_inputs(ck.open_checkpoint(tiny_ckpt).transformer_config)
    single = torch_k.stages["transformer"](**inputs)["latent"]
    assert torch.equal(composed(torch_k, inputs), single)
    # the parts run the one module's weights: no copy
    assert torch_k.stages["transformer_head"].module.block is torch_k.stages["transformer"].module.model.transformer_blocks[0]


@pytest.mark.parametrize("spec", ["fbcache:0", "teacache:0"])
def test_zero_threshold_is_the_uncached_edit_torch(torch_k, spec):
    off, cached = edit(torch_k, request("off", ["add a cat", "make it night"])), \
        edit(torch_k, request(spec, ["add a cat", "make it night"]))
    assert torch.equal(cached.latents, off.latents)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(cached.images, off.images))
    assert cached.metadata["cache"] == {"spec": spec, "steps_computed": STEPS, "steps_skipped": 0}
    assert off.metadata["cache"] == {"spec": "off", "steps_computed": STEPS, "steps_skipped": 0}


def test_zero_threshold_is_the_uncached_edit_bf16(tiny_ckpt):
    k = build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="bf16"))
    assert torch.equal(edit(k, request("fbcache:0", steps=3)).latents, edit(k, request("off", steps=3)).latents)


@pytest.mark.parametrize("spec,computed", [("fbcache:1e9", 2), ("teacache:1e9", 2),
                                           ("fbcache:1e9,warmup=2,cooldown=2", 4)])
def test_huge_threshold_computes_only_the_protected_steps(torch_k, spec, computed):
    off = edit(torch_k, request("off"))
    torch_k.reset_times()
    cached = edit(torch_k, request(spec))
    assert cached.metadata["cache"]["steps_computed"] == computed
    assert cached.metadata["cache"]["steps_skipped"] == STEPS - computed
    calls = {name: len(values) for name, values in torch_k.times.seconds.items()}
    assert calls["transformer_head"] == calls["transformer_tail"] == calls["transformer"] == STEPS  # step timed whole
    assert calls["transformer_body"] == computed
    assert not torch.equal(cached.latents, off.latents)  # a reused residual is not the computed one
    assert torch.isfinite(cached.latents).all()


def test_true_cfg_follows_the_prompt_decision(torch_k):
    cfg = dict(negative_prompt="blurry", true_cfg=2.0)
    off, zero = edit(torch_k, request("off", **cfg)), edit(torch_k, request("fbcache:0", **cfg))
    assert torch.equal(zero.latents, off.latents)
    skipped = edit(torch_k, request("fbcache:1e9", **cfg))
    assert skipped.metadata["cache"] == {"spec": "fbcache:1e+09", "steps_computed": 2, "steps_skipped": STEPS - 2}


def test_cache_needs_the_split_transformer(tiny_onnx):
    k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx))
    with pytest.raises(KontextError, match="no transformer_head: export it with `kontext-trt export --stages "
                                           "transformer_head,transformer_body,transformer_tail`"):
        edit(k, request("fbcache:0.1"))
    with pytest.raises(KontextError, match="unknown policy"):
        edit(k, request("fastcache:0.1"))


def test_ort_parts_compose_to_the_single_graph(ort_k, tiny_onnx_split):
    from kontext_trt.core.export_manifest import read_export_manifest

    manifest = read_export_manifest(tiny_onnx_split)
    for part in TRANSFORMER_PARTS:
        entry = manifest.stages[part]
        assert [v["name"] for v in entry["inputs"]] == list(STAGE_IO[part][0])
        assert [v["name"] for v in entry["outputs"]] == list(STAGE_IO[part][1])
    # the parts hold the transformer's weights once between them (the head: embedders + block 0 only)
    weights = {part: manifest.stages[part]["weight_bytes"] for part in (*TRANSFORMER_PARTS, "transformer")}
    assert abs(sum(weights[p] for p in TRANSFORMER_PARTS) - weights["transformer"]) < 0.02 * weights["transformer"]
    config = ck.open_checkpoint(manifest.checkpoint["path"]).transformer_config
    inputs = transformer_inputs(config)
    single = ort_k.stages["transformer"](**inputs)["latent"]
    assert (composed(ort_k, inputs) - single).abs().max().item() < 1e-5


def test_zero_threshold_is_the_uncached_edit_ort(ort_k, torch_k):
    off = edit(ort_k, request("off", ["add a cat", "make it night"]))
    for spec in ("fbcache:0", "teacache:0"):
        cached = edit(ort_k, request(spec, ["add a cat", "make it night"]))
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(cached.images, off.images))
        assert (cached.latents - off.latents).abs().max().item() < 1e-6
    skipped = edit(ort_k, request("teacache:1e9"))
    reference = edit(torch_k, request("teacache:1e9"))
    assert skipped.metadata["cache"] == reference.metadata["cache"]
    assert (skipped.latents - reference.latents).abs().max().item() < 1e-4  # same decisions, same result as torch


def test_cli_edit_cache(capsys, tiny_ckpt, tmp_path):
    from kontext_trt.cli.main import main

    source = tmp_path / "in.png"
    im.sample_image(64, 64).save(source)
    argv = ["edit", "--model", str(tiny_ckpt), "--dtype", "fp32", "--image", str(source), "--prompt", "a cat",
            "--steps", "4", "--no-auto-resize", "--out", str(tmp_path / "out.png")]
    assert main([*argv, "--cache", "teacache:1e9"]) == 0
    out = capsys.readouterr().out
    assert "cache teacache:1e+09: 2 steps computed, 2 skipped" in out and "transformer_body" in out
    meta = json.loads(Image.open(tmp_path / "out.png").text["kontext-trt"])
    assert meta["cache"] == {"spec": "teacache:1e+09", "steps_computed": 2, "steps_skipped": 2}
    assert main([*argv, "--cache", "teacache:much"]) == 2
    err = capsys.readouterr().err
    assert "not a number" in err and err.count("\n") == 1


def test_off_on_a_pipeline_with_only_the_parts_runs_them_all(torch_k):
    """Engines built as parts load without the single transformer: off then computes every step through the parts."""
    from dataclasses import replace

    parts_only = replace(torch_k, stages={n: s for n, s in torch_k.stages.items() if n != "transformer"},
                         times=StageTimes())
    off = edit(torch_k, request("off"))
    ours = edit(parts_only, request("off"))
    assert torch.equal(ours.latents, off.latents)
    assert ours.metadata["cache"] == {"spec": "off", "steps_computed": STEPS, "steps_skipped": 0}
    assert len(parts_only.times.seconds["transformer_body"]) == STEPS
