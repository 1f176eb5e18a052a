"""Build one double-stream and one single-stream FLUX block as the torch backend runs them, and time their forwards.

The blocks come from a FluxTransformer2DModel of one block each, built from its config as core/checkpoint.py builds
the model (random weights in bf16): diffusers' FluxTransformerBlock and FluxSingleTransformerBlock with their default
FluxAttnProcessor (torch SDPA). Their inputs are the edit's: hidden states of the target and context tokens, text
states, temb from the model's timestep/guidance embedder and the RoPE tables from the runtime's img_ids/txt_ids through
the model's pos_embed (runtime/latents.py, runtime/transformer_parts.joint_rope). Forwards are timed by core.timing's
StageTimes: CUDA events on a GPU, perf_counter on the CPU (the small-width tests). Used by benchmarks/gpu_blocks.py.
"""
from __future__ import annotations

import copy
import gc
import sys

import torch
from torch import nn

from kontext_trt.benchmarks.flops import achieved, block_flops
from kontext_trt.benchmarks.harness import summarize
from kontext_trt.benchmarks.lowp_linear import quantize_linears
from kontext_trt.benchmarks.transformer_step import default_dtype
from kontext_trt.core.timing import StageTimes, bar
from kontext_trt.engines.skus import PRECISION_MIN_SM, architecture
from kontext_trt.runtime.latents import latent_ids, text_ids
from kontext_trt.runtime.transformer_parts import joint_rope

BLOCK_KINDS = ("double", "single")
TIMESTEP, GUIDANCE = 0.5, 2.5  # mid-schedule sigma and the default guidance, scaled by 1000 as the model does


def build_model(config: dict, device: torch.device, seed: int = 0) -> nn.Module:
    """A FluxTransformer2DModel of `config` with one double and one single block, random bf16 weights, on device."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with default_dtype(torch.bfloat16), device:
        model = FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 1})
    return model.eval()


def block_inputs(model: nn.Module, config: dict, size: tuple[int, int], text_tokens: int, device: torch.device,
                 seed: int = 0) -> dict:
    """The blocks' keyword inputs for an edit of size (width, height) with a context image of the same size."""
    width, height = size
    gen = torch.Generator().manual_seed(seed)
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
    img_ids = torch.cat([latent_ids(latent_h, latent_w, 0), latent_ids(latent_h, latent_w, 1)]).to(device)
    txt_ids = text_ids(text_tokens).to(device)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    hidden_states, encoder_hidden_states = randn(1, img_ids.shape[0], hidden), randn(1, text_tokens, hidden)
    pooled = randn(1, config["pooled_projection_dim"])
    timestep = torch.full((1,), TIMESTEP * 1000, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        if config.get("guidance_embeds", True):
            guidance = torch.full((1,), GUIDANCE * 1000, device=device, dtype=torch.bfloat16)
            temb = model.time_text_embed(timestep, guidance, pooled)
        else:
            temb = model.time_text_embed(timestep, pooled)
        rope = joint_rope(model.pos_embed, img_ids, txt_ids)
    return {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states, "temb": temb,
            "image_rotary_emb": rope}


def time_block(block: nn.Module, inputs: dict, warmup: int, iters: int, device: torch.device
               ) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `iters` forwards after `warmup` untimed ones, and the last forward's change of the
    [text | image] states (output - input), to compare dtypes."""
    times = StageTimes()
    with torch.no_grad():  # as TorchStage runs its module
        for _ in range(warmup):
            block(**inputs)
        for _ in range(iters):
            with times("block", device):
                encoder, hidden = block(**inputs)
        delta = torch.cat([encoder - inputs["encoder_hidden_states"], hidden - inputs["hidden_states"]], dim=1)
    return times.seconds["block"], delta


def dtype_refusal(dtype: str, sm: int | None) -> str | None:
    """Why `dtype` cannot run on this device (sm None: the CPU), or None when it can."""
    need = PRECISION_MIN_SM[dtype]
    if dtype == "nvfp4" and not hasattr(torch, "float4_e2m1fn_x2"):
        return f"nvfp4 needs torch.float4_e2m1fn_x2, which torch {torch.__version__} lacks (2.8 or later has it)"
    if sm is None:
        return None if dtype != "nvfp4" else f"nvfp4 needs a CUDA GPU of sm{need} ({architecture(need)}) or later"
    if sm < need:
        return f"{dtype} needs sm{need} ({architecture(need)}) or later; this GPU is sm{sm} ({architecture(sm)})"
    return None


def rel_error(delta: torch.Tensor, reference: torch.Tensor) -> float:
    """||delta - reference|| / ||reference|| in float32."""
    return float((delta.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-30))


def free_memory(device: torch.device) -> None:
    """Drop what the last dtype left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def block_result(seconds: list[float], flops: int, peak: float | None, delta: torch.Tensor,
                 reference: torch.Tensor) -> dict:
    """Latency statistics, FLOP, TFLOP/s, MFU and the error against bf16 of one block in one dtype."""
    ms = summarize(seconds)
    return {"ms": ms, "flops": flops, **achieved(flops, ms["p50"] / 1e3, peak),
            "delta_rel_error_vs_bf16": rel_error(delta, reference), "finite": bool(torch.isfinite(delta).all())}


def measure_blocks(config: dict, size: tuple[int, int], text_tokens: int, dtypes: tuple[str, ...], warmup: int,
                   iters: int, device: torch.device, peaks: dict[str, float | None], sm: int | None,
                   seed: int = 0) -> dict:
    """Per dtype: each block's result (block_result), or {"skipped": why} / {"error": what broke}; the step and edit
    extrapolations are the caller's. peaks: dense TFLOP/s per dtype (None: no MFU)."""
    model = build_model(config, device, seed)
    inputs = block_inputs(model, config, size, text_tokens, device, seed)
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    image = (size[0] // 16) * (size[1] // 16)  # target tokens; the context image is the same size
    flops = block_flops(config, image, image, text_tokens, 1)
    reference = {kind: time_block(block, inputs, 0, 1, device)[1] for kind, block in blocks.items()}
    results: dict[str, dict] = {}
    for dtype in bar(dtypes, "dtypes", unit="dtype"):
        why = dtype_refusal(dtype, sm)
        if why is not None:
            results[dtype] = {"skipped": why}
            print(f"gpu_blocks: {dtype} skipped: {why}", file=sys.stderr, flush=True)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        entry: dict = {}
        try:
            for kind, base in blocks.items():
                block = base
                if dtype != "bf16":
                    block = copy.deepcopy(base)
                    entry.setdefault("linears_replaced", {})[kind] = quantize_linears(block, dtype)
                seconds, delta = time_block(block, inputs, warmup, iters, device)
                entry[kind] = block_result(seconds, flops[kind], peaks.get(dtype), delta, reference[kind])
                del block, delta
                print(f"gpu_blocks: {dtype} {kind} block: p50 {entry[kind]['ms']['p50']:.3f} ms, "
                      f"{entry[kind]['tflops']:.1f} TFLOP/s", file=sys.stderr, flush=True)
        except Exception as exc:  # one dtype's failure (an unsupported kernel, memory) must not lose the others
            entry = {"error": one_line(exc)}
            print(f"gpu_blocks: {dtype} failed: {entry['error']}", file=sys.stderr, flush=True)
        if device.type == "cuda" and "error" not in entry:
            entry["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        results[dtype] = entry
        free_memory(device)
    return results
