"""Time one FLUX.1 double-stream and one single-stream block at real width on a CUDA GPU, in bf16, fp8 and nvfp4.

    python -m kontext_trt.benchmarks.gpu_blocks [--out out/gpu-blocks.json] [--dry-run] [--dtypes bf16,fp8,nvfp4]
                                                [--iters 50] [--warmup 10]

No checkpoint and nothing to download: the blocks are built at the FLUX.1 width (hidden 3072 = 24 heads x 128, MLP
ratio 4) with random bf16 weights and run as the torch backend runs them (block_timing.py) on the 1024x1024 edit's
sequence: 512 text + 4096 target + 4096 context tokens, batch 1. Each dtype times `iters` forwards of each block with
CUDA events after `warmup`: bf16; fp8 (torch._scaled_mm, sm89+: every nn.Linear of the blocks in float8_e4m3fn,
weights per tensor, activations per tensor at every call; attention stays bf16); nvfp4 (sm100+, else a skip with the
reason). See lowp_linear.py. The JSON has the device, per dtype and block the latency (p50, p95, ...), achieved
TFLOP/s and MFU against the device's dense peak (engines/skus.py; FLOP from flops.block_flops), the output's error
against bf16, the transformer step extrapolated from its 19 double and 38 single blocks and a 28-step edit, and
flops_per_step from the FLOP model (flops.transformer_flops). --dry-run needs no GPU and imports no torch: the plan
and flops_per_step only. Progress goes to stderr, the JSON file's path to stdout; without a CUDA GPU (and without
--dry-run) one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

from kontext_trt.benchmarks.flops import DEFAULTS, MLP_RATIO, block_flops, transformer_flops
from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.engines.skus import PRECISION_MIN_SM, architecture

SCHEMA = "kontext-trt/gpu-blocks/1"
CONFIG = dict(DEFAULTS)  # diffusers' FluxTransformer2DModel defaults: FLUX.1's widths and depth (19 + 38 blocks)
SIZE = (1024, 1024)  # the edit: output and context image
TEXT_TOKENS = 512  # FLUX.1 Kontext [dev]'s T5 length, core.text.T5_MAX_LEN (imports torch; a test checks they agree)
STEPS = 28  # runtime.flow.EditRequest's default steps (likewise)
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


def edit_tokens(width: int, height: int) -> dict[str, int]:
    """Token counts of an edit of this size with a same-size context image."""
    image = (width // 16) * (height // 16)
    return {"target": image, "context": image, "text": TEXT_TOKENS, "sequence": 2 * image + TEXT_TOKENS}


def plan(dtypes: tuple[str, ...], iters: int, warmup: int) -> dict:
    """What a run measures: the width, tokens, blocks and their inputs, the dtypes and what each needs, iterations."""
    hidden = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    tokens = edit_tokens(*SIZE)
    inputs = {"hidden_states": [1, tokens["target"] + tokens["context"], hidden],
              "encoder_hidden_states": [1, tokens["text"], hidden], "temb": [1, hidden],
              "image_rotary_emb": [[tokens["sequence"], CONFIG["attention_head_dim"]]] * 2}
    return {
        "size": f"{SIZE[0]}x{SIZE[1]}", "batch": 1, "tokens": tokens,
        "width": {"hidden": hidden, "heads": CONFIG["num_attention_heads"], "head_dim": CONFIG["attention_head_dim"],
                  "mlp_ratio": MLP_RATIO},
        "blocks": {
            "double": {"class": "diffusers FluxTransformerBlock", "per_step": CONFIG["num_layers"], "inputs": inputs},
            "single": {"class": "diffusers FluxSingleTransformerBlock", "per_step": CONFIG["num_single_layers"],
                       "inputs": inputs},
        },
        "attention": "diffusers FluxAttnProcessor (torch scaled_dot_product_attention), bf16 in every dtype",
        "dtypes": {name: {"method": METHODS[name], "needs_sm": PRECISION_MIN_SM[name],
                          "needs": f"sm{PRECISION_MIN_SM[name]} ({architecture(PRECISION_MIN_SM[name])}) or later"}
                   for name in dtypes},
        "warmup": warmup, "iters": iters, "steps_per_edit": STEPS,
        "timing": "CUDA events around each block forward after warm-up; p50 of the timed forwards",
        "extrapolation": f"step = {CONFIG['num_layers']} x double p50 + {CONFIG['num_single_layers']} x single p50 "
                         f"(the blocks are 99% of the FLOP; embedders, final layer and gaps between blocks left out); "
                         f"edit = {STEPS} steps, no text encoders or VAE",
    }


def flop_model() -> dict:
    """flops_per_step (flops.transformer_flops) and each block's FLOP (flops.block_flops) for the edit."""
    tokens = edit_tokens(*SIZE)
    args = (CONFIG, tokens["target"], tokens["context"], tokens["text"], 1)
    return {"flops_per_step": transformer_flops(*args), "flops_per_block": block_flops(*args)}


def package_version(name: str) -> str | None:
    """An installed distribution's version without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dry_run(dtypes: tuple[str, ...], iters: int, warmup: int) -> dict:
    """The report without a GPU: plan and FLOP model, no device and no results."""
    return {"schema": SCHEMA, "mode": "dry-run", "device": None, "torch": package_version("torch"),
            "diffusers": package_version("diffusers"), "plan": plan(dtypes, iters, warmup), **flop_model(),
            "results": None}


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


def extrapolate(entry: dict, flops: dict[str, int]) -> dict:
    """The transformer step from its blocks' p50s (19 double + 38 single) and the edit of STEPS steps."""
    doubles, singles = CONFIG["num_layers"], CONFIG["num_single_layers"]
    step_ms = doubles * entry["double"]["ms"]["p50"] + singles * entry["single"]["ms"]["p50"]
    step_flops = doubles * flops["double"] + singles * flops["single"]
    tflops = step_flops / (step_ms / 1e3) / 1e12
    peak = entry["double"]["peak_tflops"]
    return {"step": {"ms": step_ms, "blocks_flops": step_flops, "tflops": tflops,
                     "mfu": tflops / peak if peak else None},
            "edit_ms": STEPS * step_ms}


def measure(dtypes: tuple[str, ...], iters: int, warmup: int) -> dict:
    """The full report on this process's CUDA device."""
    import torch

    from kontext_trt.benchmarks.block_timing import measure_blocks

    dev = torch.device("cuda", torch.cuda.current_device())
    device = device_report(dev)
    print(f"gpu_blocks: {device['name']} (sm{device['sm']}, SKU {device['sku']}), torch {torch.__version__}",
          file=sys.stderr, flush=True)
    model = flop_model()
    tokens = edit_tokens(*SIZE)
    start = time.perf_counter()
    results = measure_blocks(CONFIG, SIZE, tokens["text"], dtypes, warmup, iters, dev,
                             {name: device["peak_tflops"].get(name) for name in dtypes}, device["sm"])
    for dtype, entry in results.items():
        if "double" in entry and "single" in entry:
            entry.update(extrapolate(entry, model["flops_per_block"]))
            if mfu_reason(device, dtype):
                entry["mfu_reason"] = mfu_reason(device, dtype)
    return {"schema": SCHEMA, "mode": "measured", "device": device, "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": package_version("diffusers"), "plan": plan(dtypes, iters, warmup),
            **model, "results": results, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.gpu_blocks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help=f"the JSON file to write (default: {OUT})")
    p.add_argument("--dry-run", action="store_true", help="no GPU: write the plan and flops_per_step only")
    p.add_argument("--dtypes", type=arg_type(parse_dtypes), default=tuple(METHODS), help="default: bf16,fp8,nvfp4")
    p.add_argument("--iters", type=bounded("--iters", 1, MAX_ITERS), default=50, help="timed forwards per block")
    p.add_argument("--warmup", type=bounded("--warmup", 0, MAX_WARMUP), default=10, help="untimed forwards first")
    args = p.parse_args(argv)
    if args.dry_run:
        report = dry_run(args.dtypes, args.iters, args.warmup)
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: gpu_blocks times the blocks on a CUDA GPU and torch sees none here: run it on a GPU host, "
                  "or add --dry-run for the plan and flops_per_step alone", file=sys.stderr)
            return 2
        report = measure(args.dtypes, args.iters, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
