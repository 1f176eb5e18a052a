"""benchmarks/gpu_blocks.py: the dry run on CPU (FLUX.1 and FLUX.2 [klein] 4B/9B), the refusal without a GPU, the
block-timing path at a small width on the CPU for both families (klein's block inputs checked against the inputs
diffusers' Flux2Transformer2DModel hands its own blocks), and (CUDA only) the real thing with few iterations."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kontext_trt.benchmarks import block_models, block_timing, gpu_blocks
from kontext_trt.benchmarks.flops import (
    KLEIN_4B,
    KLEIN_9B,
    block_flops,
    flux2_block_flops,
    flux2_flops,
    transformer_flops,
)
from kontext_trt.benchmarks.transformer_step import preset_config
from kontext_trt.core import image
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN
from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.runtime import klein

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, *extra):
    out = tmp_path / "plan.json"
    assert gpu_blocks.main(["--dry-run", "--out", str(out), *extra]) == 0
    return out, json.loads(out.read_text())


def test_dry_run_writes_the_plan_and_the_flop_model(tmp_path, capsys):
    out, report = dry_run(tmp_path)
    assert capsys.readouterr().out == f"{out}\n"  # the JSON's path on stdout, nothing else
    full = preset_config("full")
    assert report["flops_per_step"] == transformer_flops(full, 4096, 4096, 512, 1)
    assert report["flops_per_step"]["total"] == pytest.approx(1.65e14, rel=0.01)
    assert report["flops_per_block"] == block_flops(full, 4096, 4096, 512, 1)
    step = report["flops_per_step"]
    assert (19 * report["flops_per_block"]["double"] + 38 * report["flops_per_block"]["single"]
            == step["double"] + step["single"] + step["attention"])
    plan = report["plan"]
    assert (plan["family"], plan["model_size"], plan["size"]) == ("flux1-kontext", "12B", "1024x1024")
    assert plan["tokens"] == {"target": 4096, "context": 4096, "references": 1, "text": 512, "sequence": 8704}
    assert plan["width"] == {"hidden": 3072, "heads": 24, "head_dim": 128, "mlp_ratio": 4}
    assert {kind: block["per_step"] for kind, block in plan["blocks"].items()} == {"double": 19, "single": 38}
    assert plan["blocks"]["double"]["class"] == "diffusers FluxTransformerBlock"
    assert plan["blocks"]["single"]["class"] == "diffusers FluxSingleTransformerBlock"
    assert plan["blocks"]["double"]["inputs"]["hidden_states"] == [1, 8192, 3072]
    assert plan["blocks"]["double"]["inputs"]["image_rotary_emb"] == [[8704, 128], [8704, 128]]
    assert plan["blocks"]["double"]["inputs"] == plan["blocks"]["single"]["inputs"]
    assert plan["blocks"]["single"]["inputs"]["temb"] == [1, 3072]
    assert list(plan["dtypes"]) == ["bf16", "fp8", "nvfp4"]
    assert {name: d["needs_sm"] for name, d in plan["dtypes"].items()} == {"bf16": 80, "fp8": 89, "nvfp4": 100}
    assert plan["dtypes"]["nvfp4"]["needs"] == "sm100 (Blackwell) or later"
    assert (plan["iters"], plan["warmup"], plan["steps_per_edit"]) == (50, 10, 28)
    assert report["mode"] == "dry-run" and report["device"] is None and report["results"] is None


def test_dry_run_takes_dtypes_and_iterations(tmp_path):
    _, report = dry_run(tmp_path, "--dtypes", "fp8,bf16", "--iters", "20", "--warmup", "2")
    assert list(report["plan"]["dtypes"]) == ["fp8", "bf16"]
    assert (report["plan"]["iters"], report["plan"]["warmup"]) == (20, 2)


@pytest.mark.parametrize("size,config,counts,hidden", [("4B", KLEIN_4B, (5, 20), 3072),
                                                       ("9b", KLEIN_9B, (8, 24), 4096)])
def test_klein_dry_run_plans_its_blocks_and_flop_model(tmp_path, size, config, counts, hidden):
    """FLUX.2 [klein] at the FLOP model's published widths, 3 references of 768x1024 (3072 tokens each)."""
    _, report = dry_run(tmp_path, "--family", "flux2-klein", "--model-size", size, "--size", "768x1024",
                        "--references", "3")
    plan = report["plan"]
    assert (plan["family"], plan["model_size"], plan["size"]) == ("flux2-klein", size.upper(), "768x1024")
    assert plan["model_class"] == "diffusers Flux2Transformer2DModel"
    assert plan["tokens"] == {"target": 3072, "context": 9216, "references": 3, "text": 512, "sequence": 12800}
    assert report["flops_per_step"] == flux2_flops(config, 3072, 9216, 512, 1)
    assert report["flops_per_block"] == flux2_block_flops(config, 3072, 9216, 512, 1)
    step, block = report["flops_per_step"], report["flops_per_block"]
    blocks_total = step["double"] + step["single"] + step["attention"]
    assert counts[0] * block["double"] + counts[1] * block["single"] == blocks_total
    assert plan["width"] == {"hidden": hidden, "heads": hidden // 128, "head_dim": 128, "mlp_ratio": 3.0}
    assert {kind: b["per_step"] for kind, b in plan["blocks"].items()} == dict(zip(("double", "single"), counts))
    assert plan["blocks"]["double"]["class"] == "diffusers Flux2TransformerBlock"
    assert plan["blocks"]["single"]["class"] == "diffusers Flux2SingleTransformerBlock"
    double, single = plan["blocks"]["double"]["inputs"], plan["blocks"]["single"]["inputs"]
    assert double == {"hidden_states": [1, 12288, hidden], "encoder_hidden_states": [1, 512, hidden],
                      "temb_mod_img": [1, 6 * hidden], "temb_mod_txt": [1, 6 * hidden],
                      "image_rotary_emb": [[12800, 128], [12800, 128]]}
    assert single == {"hidden_states": [1, 12288, hidden], "encoder_hidden_states": [1, 512, hidden],
                      "temb_mod": [1, 3 * hidden], "image_rotary_emb": [[12800, 128], [12800, 128]],
                      "split_hidden_states": True}
    assert plan["steps_per_edit"] == 4 and "edit = 4 steps (FLUX.2 [klein]'s default)" in plan["extrapolation"]
    assert plan["extrapolation"].startswith(f"step = {counts[0]} x double p50 + {counts[1]} x single p50")


@pytest.mark.parametrize("args,message", [
    (["--dtypes", "bf16,int4"], "--dtypes 'bf16,int4': use a comma-separated subset of bf16,fp8,nvfp4"),
    (["--iters", "0"], "--iters '0': give a whole number from 1 to 1000"),
    (["--warmup", "many"], "--warmup 'many': give a whole number from 0 to 100"),
    (["--references", "2"], "--references 2: FLUX.1 Kontext takes 0 to 1 reference images"),
    (["--family", "flux2-klein", "--references", "5"], "--references 5: FLUX.2 [klein] takes 0 to 4 reference images"),
    (["--family", "flux2-klein", "--model-size", "12B"], "--model-size '12B': FLUX.2 [klein] comes in 4B, 9B"),
    (["--model-size", "4B"], "--model-size '4B': FLUX.1 Kontext comes in 12B"),
    (["--family", "flux3"], "argument --family: invalid choice: 'flux3'"),
    (["--size", "1000x1024"], "--size '1000x1024': each side must be a multiple of 16 from 64 to 2048"),
    (["--size", "big"], "--size 'big' is not WIDTHxHEIGHT: write it like 1024x1024"),
])
def test_bad_arguments_are_one_usage_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        gpu_blocks.main(["--dry-run", "--out", str(tmp_path / "x.json"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_dry_run_imports_no_torch(tmp_path):
    """--dry-run must not import CUDA-only things: it imports no torch at all (klein's plan neither)."""
    code = ("import sys; from kontext_trt.benchmarks import gpu_blocks; "
            f"rc = gpu_blocks.main(['--dry-run', '--family', 'flux2-klein', '--out', {str(tmp_path / 'p.json')!r}]); "
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_constants_agree_with_the_runtime():
    flux1, klein_4b, klein_9b = (block_models.block_model(family, size) for family, size in
                                 (("flux1-kontext", None), ("flux2-klein", None), ("flux2-klein", "9B")))
    assert flux1.text_tokens == T5_MAX_LEN and klein_4b.text_tokens == klein_9b.text_tokens == klein.TEXT_LEN
    assert (FLUX1_KONTEXT.default_steps, FLUX2_KLEIN.default_steps, FLUX2_KLEIN.base_steps) == (28, 4, 50)
    assert flux1.config == preset_config("full") and (klein_4b.config, klein_9b.config) == (KLEIN_4B, KLEIN_9B)
    assert (flux1.family, klein_4b.family, klein_9b.family) == (FLUX1_KONTEXT, FLUX2_KLEIN, FLUX2_KLEIN)
    assert (gpu_blocks.MULTIPLE, gpu_blocks.SIDES) == (image.MULTIPLE, (image.MIN_SIDE, image.MAX_SIDE))
    assert gpu_blocks.parse_image_size("832x1248") == image.parse_size("832x1248")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a host without a GPU")
def test_without_gpu_exits_2_with_one_line(tmp_path, capsys):
    assert gpu_blocks.main(["--out", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: gpu_blocks times the blocks on a CUDA GPU") and captured.err.count("\n") == 1
    assert "--dry-run" in captured.err and captured.out == ""
    assert not (tmp_path / "r.json").exists()


def test_dtype_refusals():
    hopper = "nvfp4 needs sm100 (Blackwell) or later; this GPU is sm90 (Hopper)"
    assert block_timing.dtype_refusal("nvfp4", 90) == hopper
    assert block_timing.dtype_refusal("fp8", 80) == "fp8 needs sm89 (Ada) or later; this GPU is sm80 (Ampere)"
    assert block_timing.dtype_refusal("fp8", 90) is None and block_timing.dtype_refusal("bf16", 90) is None
    assert block_timing.dtype_refusal("nvfp4", 100) is None and block_timing.dtype_refusal("nvfp4", 120) is None
    assert block_timing.dtype_refusal("nvfp4", None) == "nvfp4 needs a CUDA GPU of sm100 (Blackwell) or later"


def test_mfu_reasons():
    unknown = {"name": "NVIDIA Z9", "sku": None, "peak_tflops": {}}
    assert gpu_blocks.mfu_reason(unknown, "bf16") == ("NVIDIA Z9 is not in the SKU table (engines/skus.py): no dense "
                                                      "peak to compare with")
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "sku": "a100", "peak_tflops": {"bf16": 312.0}}
    assert gpu_blocks.mfu_reason(a100, "fp8") == "the SKU table has no dense fp8 peak for a100"
    assert gpu_blocks.mfu_reason(a100, "bf16") is None


FLUX1_TINY = replace(block_models.FLUX1_12B, config=preset_config("tiny"), text_tokens=8)
# klein at a tiny width (hidden 32 = 2 heads x 16, RoPE axes 4 x 4), 6 text tokens
KLEIN_TINY = replace(block_models.KLEIN_4B_BLOCKS, text_tokens=6, config={
    **KLEIN_4B, "in_channels": 8, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24,
    "timestep_guidance_channels": 32, "axes_dims_rope": (4, 4, 4, 4)})


@pytest.fixture(scope="module")
def small_run():
    """The GPU path's block timing at the tiny preset's width (hidden 64 = 2 heads x 32) on the CPU: a 32x32 edit
    (4 target + 4 context tokens), 8 text tokens, perf_counter instead of CUDA events."""
    results = block_timing.measure_blocks(FLUX1_TINY, (32, 32), 1, ("bf16", "fp8", "nvfp4"), 1, 3,
                                          torch.device("cpu"), {"bf16": 100.0}, None)
    return FLUX1_TINY.config, results


@pytest.fixture(scope="module")
def klein_run():
    """The same at klein's tiny width: a 48x32 edit (6 target tokens) with 2 references of that size."""
    return block_timing.measure_blocks(KLEIN_TINY, (48, 32), 2, ("bf16", "fp8", "nvfp4"), 1, 3, torch.device("cpu"),
                                       {"bf16": 50.0}, None)


def test_small_width_cpu_run_times_both_blocks(small_run):
    config, results = small_run
    flops = block_flops(config, 4, 4, 8)
    for kind in ("double", "single"):
        bf16 = results["bf16"][kind]
        assert bf16["ms"]["n"] == 3 and 0 < bf16["ms"]["min"] <= bf16["ms"]["p50"] <= bf16["ms"]["max"]
        assert bf16["flops"] == flops[kind]
        assert bf16["tflops"] == pytest.approx(flops[kind] / (bf16["ms"]["p50"] / 1e3) / 1e12)
        assert bf16["mfu"] == pytest.approx(bf16["tflops"] / 100.0) and bf16["peak_tflops"] == 100.0
        assert bf16["delta_rel_error_vs_bf16"] == 0.0 and bf16["finite"]
        fp8 = results["fp8"][kind]
        assert fp8["ms"]["n"] == 3 and fp8["ms"]["p50"] > 0 and fp8["mfu"] is None and fp8["finite"]
        assert 0 < fp8["delta_rel_error_vs_bf16"] < 0.3  # e4m3 has 3 mantissa bits
    assert results["fp8"]["linears_replaced"] == {"double": 14, "single": 6}
    assert results["nvfp4"] == {"skipped": "nvfp4 needs a CUDA GPU of sm100 (Blackwell) or later"}


def test_klein_small_width_cpu_run_times_both_blocks(klein_run):
    flops = flux2_block_flops(KLEIN_TINY.config, 6, 12, 6)
    assert flops["double"] == flops["single"] == 2 * 24 * 32 * 32 * 13 + 4 * 24 * 24 * 32  # 13 d^2 linear a token
    for kind in ("double", "single"):
        bf16 = klein_run["bf16"][kind]
        assert bf16["ms"]["n"] == 3 and 0 < bf16["ms"]["min"] <= bf16["ms"]["p50"] <= bf16["ms"]["max"]
        assert bf16["flops"] == flops[kind] and bf16["mfu"] == pytest.approx(bf16["tflops"] / 50.0)
        assert bf16["delta_rel_error_vs_bf16"] == 0.0 and bf16["finite"]
        fp8 = klein_run["fp8"][kind]
        assert fp8["ms"]["n"] == 3 and fp8["finite"] and 0 < fp8["delta_rel_error_vs_bf16"] < 0.3
    # double: q, k, v, out and the text stream's four, SwiGLU in and out per stream; single: fused qkv+mlp in, out
    assert klein_run["fp8"]["linears_replaced"] == {"double": 12, "single": 2}
    assert klein_run["nvfp4"] == {"skipped": "nvfp4 needs a CUDA GPU of sm100 (Blackwell) or later"}


@pytest.mark.parametrize("model,size,references", [(FLUX1_TINY, (32, 48), 1), (KLEIN_TINY, (48, 32), 2),
                                                   (KLEIN_TINY, (32, 32), 0)])
def test_blocks_are_the_planned_classes_with_the_planned_inputs(model, size, references):
    """The built model's blocks are the classes the plan names; their inputs have the plan's shapes and values; each
    block returns (text states, image states) of its inputs' shapes."""
    module = block_timing.build_model(model, torch.device("cpu"))
    blocks = {"double": module.transformer_blocks[0], "single": module.single_transformer_blocks[0]}
    assert {kind: type(block).__name__ for kind, block in blocks.items()} == model.block_classes
    inputs = block_timing.block_inputs(module, model, size, references, torch.device("cpu"))
    shapes = block_models.block_input_shapes(model, block_models.edit_tokens(model, *size, references))
    for kind, block in blocks.items():
        got = {name: [list(t.shape) for t in value] if isinstance(value, tuple) else
               list(value.shape) if isinstance(value, torch.Tensor) else value for name, value in inputs[kind].items()}
        assert got == shapes[kind]
        with torch.no_grad():
            text, hidden = block(**inputs[kind])
        assert text.shape == inputs[kind]["encoder_hidden_states"].shape
        assert hidden.shape == inputs[kind]["hidden_states"].shape and bool(torch.isfinite(hidden).all())


def test_klein_block_inputs_are_what_the_model_hands_its_blocks():
    """Run the whole tiny Flux2Transformer2DModel on ids from diffusers' Flux2KleinPipeline helpers (target at t = 0,
    two references at t = 10 and 20, text along the fourth axis) at sigma 0.5, capture what it passes to its double
    and single block, and compare: modulations and RoPE tables equal exactly."""
    from diffusers import Flux2KleinPipeline as Pipe

    module = block_timing.build_model(KLEIN_TINY, torch.device("cpu"))
    mine = block_timing.block_inputs(module, KLEIN_TINY, (48, 32), 2, torch.device("cpu"))
    latent = torch.zeros(1, 8, 2, 3)  # (B, C, rows, cols) of a 48x32 image
    img_ids = torch.cat([Pipe._prepare_latent_ids(latent), Pipe._prepare_image_ids([latent, latent])], dim=1)
    txt_ids = Pipe._prepare_text_ids(torch.zeros(1, 6, 24))
    seen = {}
    for kind, block in (("double", module.transformer_blocks[0]), ("single", module.single_transformer_blocks[0])):
        block.register_forward_pre_hook(lambda _, args, kwargs, kind=kind: seen.update({kind: kwargs}),
                                        with_kwargs=True)
    with torch.no_grad():
        module(hidden_states=torch.randn(1, 18, 8, dtype=torch.bfloat16), timestep=torch.full((1,), 0.5),
               encoder_hidden_states=torch.randn(1, 6, 24, dtype=torch.bfloat16), img_ids=img_ids, txt_ids=txt_ids)
    for kind, names in (("double", ("temb_mod_img", "temb_mod_txt")), ("single", ("temb_mod",))):
        for name in names:
            assert torch.equal(mine[kind][name], seen[kind][name]), (kind, name)
        for mine_table, model_table in zip(mine[kind]["image_rotary_emb"], seen[kind]["image_rotary_emb"]):
            assert torch.equal(mine_table, model_table)
    assert mine["single"]["split_hidden_states"] is True and seen["single"]["encoder_hidden_states"] is None


def test_step_and_edit_are_extrapolated_from_the_blocks(small_run, klein_run):
    flops = {"double": 1_000_000_000_000, "single": 2_000_000_000_000}
    for model, results, counts, steps in ((block_models.FLUX1_12B, small_run[1], (19, 38), 28),
                                          (block_models.KLEIN_9B_BLOCKS, klein_run, (8, 24), 4)):
        entry = results["bf16"]
        extra = gpu_blocks.extrapolate(model, entry, flops)
        step_ms = counts[0] * entry["double"]["ms"]["p50"] + counts[1] * entry["single"]["ms"]["p50"]
        assert extra["step"]["ms"] == pytest.approx(step_ms) and extra["edit_ms"] == pytest.approx(steps * step_ms)
        blocks = (counts[0] + 2 * counts[1]) * 1_000_000_000_000
        assert extra["step"]["blocks_flops"] == blocks
        assert extra["step"]["tflops"] == pytest.approx(blocks / 1e12 / step_ms * 1e3)
        assert extra["step"]["mfu"] == pytest.approx(extra["step"]["tflops"] / entry["double"]["peak_tflops"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_width_on_the_gpu(tmp_path):
    out = tmp_path / "blocks.json"
    assert gpu_blocks.main(["--out", str(out), "--iters", "3", "--warmup", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "measured" and report["device"]["sm"] >= 80
    bf16 = report["results"]["bf16"]
    for kind in ("double", "single"):
        assert bf16[kind]["ms"]["n"] == 3 and bf16[kind]["ms"]["p50"] > 0 and bf16[kind]["finite"]
    assert bf16["step"]["ms"] > 0 and bf16["edit_ms"] == pytest.approx(28 * bf16["step"]["ms"])
    fp8, nvfp4 = report["results"]["fp8"], report["results"]["nvfp4"]
    assert ("double" in fp8) == (report["device"]["sm"] >= 89)
    assert ("skipped" in nvfp4) == (report["device"]["sm"] < 100)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_klein_real_width_on_the_gpu(tmp_path):
    out = tmp_path / "klein.json"
    assert gpu_blocks.main(["--family", "flux2-klein", "--model-size", "9B", "--references", "2", "--dtypes",
                            "bf16,fp8", "--out", str(out), "--iters", "3", "--warmup", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["plan"]["tokens"]["sequence"] == 512 + 3 * 4096
    bf16 = report["results"]["bf16"]
    for kind in ("double", "single"):
        assert bf16[kind]["ms"]["n"] == 3 and bf16[kind]["ms"]["p50"] > 0 and bf16[kind]["finite"]
    assert bf16["edit_ms"] == pytest.approx(4 * bf16["step"]["ms"])
    if report["device"]["sm"] >= 89:
        assert report["results"]["fp8"]["linears_replaced"] == {"double": 12, "single": 2}
        assert 0 < report["results"]["fp8"]["double"]["delta_rel_error_vs_bf16"] < 0.3
