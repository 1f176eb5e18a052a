"""Time one transformer step of FLUX.1 Kontext at real size with random weights, and report its MFU.

    python -m kontext_trt.benchmarks.transformer_step --device cuda            # 12B, bf16, 1024x1024 + 1024x1024
    python -m kontext_trt.benchmarks.transformer_step --preset tiny --device cpu --size 64x64 --iters 1

No checkpoint is needed: the model is built from its config with random bf16 weights (24 GB at full size)
and called through the torch backend's transformer stage, with the loop's named inputs. Prints one JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from kontext_trt.benchmarks.flops import DEFAULTS, achieved, transformer_flops
from kontext_trt.benchmarks.harness import summarize
from kontext_trt.benchmarks.memory import reset_peaks
from kontext_trt.benchmarks.system import gpu_info
from kontext_trt.core.checks import pick_device, resolve_device
from kontext_trt.core.dtypes import DTYPES, TORCH_BACKEND_DTYPES
from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.core.image import parse_sizes
from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.core.timing import StageTimes


def preset_config(name: str) -> dict:
    """Transformer config: `full` (FLUX.1 widths and depth) or the synthetic `slim`/`tiny` presets."""
    from kontext_trt.synth import PRESETS

    return {**DEFAULTS, **({} if name == "full" else PRESETS[name]["transformer"])}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in dtype (so a 12B model never exists in fp32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_stage(config: dict, dtype: torch.dtype, device: torch.device):
    """The torch backend's transformer stage over a randomly initialised FluxTransformer2DModel."""
    from diffusers import FluxTransformer2DModel

    from kontext_trt.runtime.torch_stages import TorchStage, TransformerModule

    with default_dtype(dtype), device:
        model = FluxTransformer2DModel(**config)
    return TorchStage("transformer", TransformerModule(model), device, dtype)


def step_inputs(config: dict, batch: int, target: int, context: int, device: torch.device,
                text_length: int = T5_MAX_LEN) -> dict[str, torch.Tensor]:
    """Random named inputs of one step (float32, as the loop hands them over), text_length T5 tokens (FLUX.1
    Kontext [dev]'s 512 unless given)."""
    gen = torch.Generator().manual_seed(0)
    image = target + context
    ids = torch.zeros(image, 3)
    ids[target:, 0] = 1.0
    inputs = {
        "hidden_states": torch.randn(batch, image, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_length, config["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen),
        "timestep": torch.full((batch,), 0.5), "img_ids": ids, "txt_ids": torch.zeros(text_length, 3),
        "guidance": torch.full((batch,), 2.5),
    }
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def time_step(preset: str, width: int, height: int, batch: int = 1, context: bool = True, dtype: str = "bf16",
              device: str = "cuda", warmup: int = 3, iters: int = 10, text_length: int = T5_MAX_LEN) -> dict:
    """Build, warm up and time the step over text_length T5 tokens; latency stats, FLOP, TFLOP/s, MFU and peak
    memory as a dict."""
    dev = resolve_device(device)
    config = preset_config(preset)
    stage = build_stage(config, DTYPES[dtype], dev)
    target = (width // 16) * (height // 16)
    inputs = step_inputs(config, batch, target, target if context else 0, dev, text_length)
    reset_peaks(dev)
    for _ in range(warmup):
        stage(**inputs)
    times = StageTimes()
    for _ in range(iters):
        with times("transformer", dev):
            stage(**inputs)
    stats = summarize(times.seconds["transformer"])
    gpu = gpu_info(dev)
    peak = gpu["peak_tflops"].get(dtype) if gpu else None
    flops = transformer_flops(config, target, target if context else 0, text_length, batch)
    return {"preset": preset, "width": width, "height": height, "batch": batch, "context": context, "dtype": dtype,
            "text_length": text_length,
            "device": str(dev), "gpu": gpu, "params": sum(p.numel() for p in stage.module.parameters()),
            "step_ms": stats, "flops_per_step": flops, **achieved(flops["total"], stats["p50"] / 1e3, peak),
            "device_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.transformer_step", description=__doc__)
    p.add_argument("--preset", choices=("full", "slim", "tiny"), default="full")
    p.add_argument("--size", type=arg_type(parse_sizes), default=[(1024, 1024)],
                   help="target WxH (context the same size)")
    p.add_argument("--no-context", dest="context", action="store_false", help="text-to-image: no context tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-length", type=int, default=T5_MAX_LEN,
                   help=f"T5 tokens (default {T5_MAX_LEN}, FLUX.1 Kontext [dev]'s; a checkpoint's tokenizer_2 says)")
    p.add_argument("--dtype", choices=TORCH_BACKEND_DTYPES, default="bf16")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not 1 <= args.text_length <= T5_MAX_LEN:
        p.error(f"--text-length {args.text_length}: T5 reads 1 to {T5_MAX_LEN} tokens")
    (width, height), = args.size
    try:
        result = time_step(args.preset, width, height, args.batch, args.context, args.dtype, pick_device(args.device),
                           args.warmup, args.iters, args.text_length)
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
