"""Time one double-stream and one single-stream block of a FLUX transformer at real width on a CUDA GPU, in bf16,
fp8 and nvfp4, and extrapolate the transformer step and the edit.

    python -m kontext_trt.benchmarks.gpu_blocks [--family flux1-kontext|flux2-klein] [--model-size 4B|9B]
                                                [--size 1024x1024] [--references 1] [--out out/gpu-blocks.json]
                                                [--dry-run] [--dtypes bf16,fp8,nvfp4] [--iters 50] [--warmup 10]

No checkpoint and nothing to download: the blocks are built at the real widths of the model asked
(block_models.py: FLUX.1 Kontext [dev] 12B, hidden 3072 = 24 heads x 128, MLP ratio 4, 19 double + 38 single blocks;
FLUX.2 [klein] 4B, 3072 = 24 x 128, SwiGLU ratio 3, 5 + 20 blocks; klein 9B, 4096 = 32 x 128, 8 + 24 blocks; the
FLOP model's configs) with random bf16 weights and run as the torch backend runs them (block_timing.py) on an
edit's sequence: 512 text tokens + the target + each reference image at the size asked (1024x1024: 4096 tokens
each), batch 1. Each dtype times `iters` forwards of each block with CUDA events after `warmup`: bf16; fp8
(torch._scaled_mm, sm89+: every nn.Linear of the blocks in float8_e4m3fn, weights per tensor, activations per tensor
at every call; attention stays bf16); nvfp4 (sm100+, else a skip with the reason). See lowp_linear.py. The JSON has
the device, per dtype and block the latency (p50, p95, ...), achieved TFLOP/s and MFU against the device's dense
peak (engines/skus.py; FLOP from flops.step_block_flops), the output's error against bf16, the transformer step
extrapolated from the model's block counts and the edit from its family's default steps (core.family: FLUX.1 28,
klein 4), and flops_per_step from the FLOP model (flops.step_flops). --dry-run needs no GPU and imports no torch:
the plan and flops_per_step only. Progress goes to stderr, the JSON file's path to stdout; without a CUDA GPU (and
without --dry-run) one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

from kontext_trt.benchmarks.block_models import (
    FAMILY_NAMES,
    BlockModel,
    block_input_shapes,
    block_model,
    edit_tokens,
)
from kontext_trt.benchmarks.flops import step_block_flops, step_flops
from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.core.files import write_atomic
from kontext_trt.engines.skus import PRECISION_MIN_SM, architecture

SCHEMA = "kontext-trt/gpu-blocks/1"
SIZE = (1024, 1024)  # the default edit: output and each reference image
MULTIPLE, SIDES = 16, (64, 2048)  # core.image's size rule (imports torch; a test checks they agree)
METHODS = {
    "bf16": "every nn.Linear, attention and the elementwise ops in bf16 (the torch backend's dtype)",
    "fp8": "every nn.Linear as float8_e4m3fn over torch._scaled_mm: weights quantized per tensor once, activations "
           "per tensor at every call (power-of-two scales), bias fused, bf16 out; attention and the rest in bf16",
    "nvfp4": "every nn.Linear as NVFP4 over torch._scaled_mm: float4_e2m1fn_x2 values, float8_e4m3fn scales per 16 "
             "values (swizzled 128x4) and a per-tensor scale, on weights once and activations at every call; "
             "attention and the rest in bf16",
}
MAX_ITERS, MAX_WARMUP = 1000, 100  # bounds that keep a run well inside 8 minutes on an H100
OUT = Path("out/gpu-blocks.json")


def parse_dtypes(text: str) -> tuple[str, ...]:
    """--dtypes: a comma-separated subset of bf16, fp8, nvfp4, in the order given."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise KontextError(f"--dtypes {text!r}: use a comma-separated subset of {','.join(METHODS)}")
    return names


def bounded(name: str, low: int, high: int):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise KontextError(f"{name} {text!r}: give a whole number from {low} to {high}")
        return value

    parse.__name__ = name.lstrip("-")
    return arg_type(parse)


def parse_image_size(text: str) -> tuple[int, int]:
    """--size: WIDTHxHEIGHT, each side a multiple of 16 from 64 to 2048 (core.image.parse_size's rule)."""
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise KontextError(f"--size {text!r} is not WIDTHxHEIGHT: write it like 1024x1024") from None
    for side in (width, height):
        if side % MULTIPLE or not SIDES[0] <= side <= SIDES[1]:
            raise KontextError(f"--size {text!r}: each side must be a multiple of {MULTIPLE} from {SIDES[0]} to "
                               f"{SIDES[1]}")
    return width, height


def plan(model: BlockModel, size: tuple[int, int], references: int, dtypes: tuple[str, ...], iters: int,
         warmup: int) -> dict:
    """What a run measures: the model, width, tokens, blocks and their inputs, the dtypes and what each needs,
    iterations, and how the step and the edit are extrapolated."""
    tokens = edit_tokens(model, *size, references)
    shapes = block_input_shapes(model, tokens)
    step = flop_model(model, tokens)["flops_per_step"]
    blocks_share = (step["double"] + step["single"] + step["attention"]) / step["total"]
    counts, steps = model.per_step, model.family.default_steps
    return {
        "family": model.family.name, "model_size": model.size, "model_class": f"diffusers {model.model_class}",
        "size": f"{size[0]}x{size[1]}", "batch": 1, "tokens": tokens,
        "width": {"hidden": model.hidden, "heads": model.heads, "head_dim": model.head_dim,
                  "mlp_ratio": model.mlp_ratio},
        "blocks": {kind: {"class": f"diffusers {model.block_classes[kind]}", "per_step": counts[kind],
                          "inputs": shapes[kind]} for kind in shapes},
        "attention": model.attention,
        "dtypes": {name: {"method": METHODS[name], "needs_sm": PRECISION_MIN_SM[name],
                          "needs": f"sm{PRECISION_MIN_SM[name]} ({architecture(PRECISION_MIN_SM[name])}) or later"}
                   for name in dtypes},
        "warmup": warmup, "iters": iters, "steps_per_edit": steps,
        "timing": "CUDA events around each block forward after warm-up; p50 of the timed forwards",
        "extrapolation": f"step = {counts['double']} x double p50 + {counts['single']} x single p50 (the blocks are "
                         f"{blocks_share:.2%} of the FLOP; what runs outside them (embedders, klein's shared "
                         f"modulations, final layer) and gaps between blocks left out); edit = {steps} steps ({model.family.label}'s default), one pass a step "
                         "(no CFG), no text encoder or VAE",
    }


def flop_model(model: BlockModel, tokens: dict[str, int]) -> dict:
    """flops_per_step (flops.step_flops) and each block's FLOP (flops.step_block_flops) for the edit's tokens."""
    args = (model.config, tokens["target"], tokens["context"], tokens["text"], 1)
    return {"flops_per_step": step_flops(*args), "flops_per_block": step_block_flops(*args)}


def package_version(name: str) -> str | None:
    """An installed distribution's version without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dry_run(model: BlockModel, size: tuple[int, int], references: int, dtypes: tuple[str, ...], iters: int,
            warmup: int) -> dict:
    """The report without a GPU: plan and FLOP model, no device and no results."""
    return {"schema": SCHEMA, "mode": "dry-run", "device": None, "torch": package_version("torch"),
            "diffusers": package_version("diffusers"), "plan": plan(model, size, references, dtypes, iters, warmup),
            **flop_model(model, edit_tokens(model, *size, references)), "results": None}


def device_report(device) -> dict:
    """Name, compute capability, memory and the SKU table's dense peaks of the GPU (system.gpu_info)."""
    from kontext_trt.benchmarks.system import gpu_info

    info = gpu_info(device)
    return {"name": info["name"], "sm": info["sm"], "memory_bytes": info["memory_bytes"], "driver": info["driver"],
            "sku": info["sku"], "peak_tflops": info["peak_tflops"]}


def mfu_reason(device: dict, dtype: str) -> str | None:
    """Why a dtype's MFU is null: the GPU is not in the SKU table, or its entry has no peak for that dtype."""
    if device["sku"] is None:
        return f"{device['name']} is not in the SKU table (engines/skus.py): no dense peak to compare with"
    if dtype not in device["peak_tflops"]:
        return f"the SKU table has no dense {dtype} peak for {device['sku']}"
    return None


def extrapolate(model: BlockModel, entry: dict, flops: dict[str, int]) -> dict:
    """The transformer step from its blocks' p50s and the model's block counts, and the edit of the family's default
    steps."""
    counts = model.per_step
    step_ms = sum(counts[kind] * entry[kind]["ms"]["p50"] for kind in counts)
    blocks_flops = sum(counts[kind] * flops[kind] for kind in counts)
    tflops = blocks_flops / (step_ms / 1e3) / 1e12
    peak = entry["double"]["peak_tflops"]
    return {"step": {"ms": step_ms, "blocks_flops": blocks_flops, "tflops": tflops,
                     "mfu": tflops / peak if peak else None},
            "edit_ms": model.family.default_steps * step_ms}


def measure(model: BlockModel, size: tuple[int, int], references: int, dtypes: tuple[str, ...], iters: int,
            warmup: int) -> dict:
    """The full report on this process's CUDA device."""
    import torch

    from kontext_trt.benchmarks.block_timing import measure_blocks

    dev = torch.device("cuda", torch.cuda.current_device())
    device = device_report(dev)
    print(f"gpu_blocks: {model.family.label} {model.size} on {device['name']} (sm{device['sm']}, SKU "
          f"{device['sku']}), torch {torch.__version__}", file=sys.stderr, flush=True)
    flops = flop_model(model, edit_tokens(model, *size, references))
    start = time.perf_counter()
    results = measure_blocks(model, size, references, dtypes, warmup, iters, dev,
                             {name: device["peak_tflops"].get(name) for name in dtypes}, device["sm"])
    for dtype, entry in results.items():
        if "double" in entry and "single" in entry:
            entry.update(extrapolate(model, entry, flops["flops_per_block"]))
            if mfu_reason(device, dtype):
                entry["mfu_reason"] = mfu_reason(device, dtype)
    return {"schema": SCHEMA, "mode": "measured", "device": device, "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": package_version("diffusers"),
            "plan": plan(model, size, references, dtypes, iters, warmup), **flops, "results": results,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.gpu_blocks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILY_NAMES, default=FAMILY_NAMES[0], help="the model family's blocks")
    p.add_argument("--model-size", help="flux2-klein: 4B (default) or 9B; flux1-kontext: 12B")
    p.add_argument("--size", type=arg_type(parse_image_size), default=SIZE, help="output and each reference image")
    p.add_argument("--references", type=int, default=1, help="reference images (default 1; klein takes up to 4)")
    p.add_argument("--out", type=Path, default=OUT, help=f"the JSON file to write (default: {OUT})")
    p.add_argument("--dry-run", action="store_true", help="no GPU: write the plan and flops_per_step only")
    p.add_argument("--dtypes", type=arg_type(parse_dtypes), default=tuple(METHODS), help="default: bf16,fp8,nvfp4")
    p.add_argument("--iters", type=bounded("--iters", 1, MAX_ITERS), default=50, help="timed forwards per block")
    p.add_argument("--warmup", type=bounded("--warmup", 0, MAX_WARMUP), default=10, help="untimed forwards first")
    args = p.parse_args(argv)
    try:
        model = block_model(args.family, args.model_size)
        edit_tokens(model, *args.size, args.references)
    except KontextError as exc:
        p.error(str(exc))
    run = (args.size, args.references, args.dtypes, args.iters, args.warmup)
    if args.dry_run:
        report = dry_run(model, *run)
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: gpu_blocks times the blocks on a CUDA GPU and torch sees none here: run it on a GPU host, "
                  "or add --dry-run for the plan and flops_per_step alone", file=sys.stderr)
            return 2
        report = measure(model, *run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
