"""Build one double-stream and one single-stream block of a FLUX transformer as the torch backend runs them, and
time their forwards.

The blocks come from the model class of a block_models.BlockModel (diffusers' FluxTransformer2DModel for FLUX.1,
Flux2Transformer2DModel for FLUX.2 [klein]) with one block of each kind, built from its config as the checkpoint
loaders build the model (random weights in bf16), with their default SDPA attention processors. Their inputs are an
edit's: hidden states of the target and reference tokens, text states, the conditioning from the model's own
timestep embedder (FLUX.1: temb with guidance and pooled text; klein: its shared double and single modulations) and
the RoPE tables from the runtime's position ids through the model's pos_embed (FLUX.1: runtime/latents.py with
runtime/transformer_parts.joint_rope; klein: runtime/klein.grid_ids, text along the fourth axis). Forwards are timed
by core.timing's StageTimes: CUDA events on a GPU, perf_counter on the CPU (the small-width tests). Used by
benchmarks/gpu_blocks.py.
"""
from __future__ import annotations

import copy
import gc
import sys

import torch
from torch import nn

from kontext_trt.benchmarks.block_models import BlockModel, edit_tokens
from kontext_trt.benchmarks.flops import achieved, step_block_flops
from kontext_trt.benchmarks.harness import summarize
from kontext_trt.benchmarks.lowp_linear import quantize_linears
from kontext_trt.benchmarks.transformer_step import default_dtype
from kontext_trt.core.timing import StageTimes, bar
from kontext_trt.engines.skus import PRECISION_MIN_SM, architecture
from kontext_trt.runtime.klein import REFERENCE_T, grid_ids
from kontext_trt.runtime.latents import latent_ids, text_ids
from kontext_trt.runtime.transformer_parts import joint_rope

TIMESTEP, GUIDANCE = 0.5, 2.5  # mid-schedule sigma and FLUX.1's default guidance, scaled by 1000 as the model does


def build_model(model: BlockModel, device: torch.device, seed: int = 0) -> nn.Module:
    """The model class of `model` with one double and one single block, random bf16 weights, on device."""
    import diffusers

    torch.manual_seed(seed)
    with default_dtype(torch.bfloat16), device:
        module = getattr(diffusers, model.model_class)(**{**model.diffusers_config(), "num_layers": 1,
                                                          "num_single_layers": 1})
    return module.eval()


def flux1_conditioning(module: nn.Module, model: BlockModel, size: tuple[int, int], references: int,
                       gen: torch.Generator, device: torch.device) -> dict[str, dict]:
    """FLUX.1: one temb (timestep, guidance, pooled text) for both blocks; target ids at index 0, the context at 1."""
    width, height = size
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
    img_ids = torch.cat([latent_ids(latent_h, latent_w, 0 if i == 0 else 1) for i in range(1 + references)])
    pooled = torch.randn(1, model.config["pooled_projection_dim"], generator=gen).to(device, torch.bfloat16)
    timestep = torch.full((1,), TIMESTEP * 1000, device=device, dtype=torch.bfloat16)
    if model.config.get("guidance_embeds", True):
        guidance = torch.full((1,), GUIDANCE * 1000, device=device, dtype=torch.bfloat16)
        temb = module.time_text_embed(timestep, guidance, pooled)
    else:
        temb = module.time_text_embed(timestep, pooled)
    rope = joint_rope(module.pos_embed, img_ids.to(device), text_ids(model.text_tokens).to(device))
    return {kind: {"temb": temb, "image_rotary_emb": rope} for kind in ("double", "single")}


def flux2_conditioning(module: nn.Module, model: BlockModel, size: tuple[int, int], references: int,
                       gen: torch.Generator, device: torch.device) -> dict[str, dict]:
    """FLUX.2 [klein]: the shared modulations of the timestep embedding (no guidance); ids [t, row, col, 0] with the
    target at t = 0 and reference i at t = 10 (i + 1), text [0, 0, 0, l]; RoPE of [text | image] as the model joins
    it."""
    rows, cols = size[1] // 16, size[0] // 16
    img_ids = torch.cat([grid_ids(REFERENCE_T * i, rows, cols) for i in range(1 + references)]).to(device)
    txt_ids = torch.zeros(model.text_tokens, 4)
    txt_ids[:, 3] = torch.arange(model.text_tokens)
    temb = module.time_guidance_embed(torch.full((1,), TIMESTEP * 1000, device=device, dtype=torch.bfloat16), None)
    image_rope, text_rope = module.pos_embed(img_ids), module.pos_embed(txt_ids.to(device))
    rope = tuple(torch.cat([text_part, image_part]) for text_part, image_part in zip(text_rope, image_rope))
    return {"double": {"temb_mod_img": module.double_stream_modulation_img(temb),
                       "temb_mod_txt": module.double_stream_modulation_txt(temb), "image_rotary_emb": rope},
            "single": {"temb_mod": module.single_stream_modulation(temb), "image_rotary_emb": rope}}


CONDITIONING = {"FluxTransformer2DModel": flux1_conditioning, "Flux2Transformer2DModel": flux2_conditioning}


def block_inputs(module: nn.Module, model: BlockModel, size: tuple[int, int], references: int, device: torch.device,
                 seed: int = 0) -> dict[str, dict]:
    """Each block's keyword inputs (block_models.block_input_shapes gives their shapes) for an edit of size (width,
    height) with `references` reference images of the same size."""
    gen = torch.Generator().manual_seed(seed)
    tokens = edit_tokens(model, *size, references)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    states = {"hidden_states": randn(1, tokens["target"] + tokens["context"], model.hidden),
              "encoder_hidden_states": randn(1, tokens["text"], model.hidden)}
    with torch.no_grad():
        conditioning = CONDITIONING[model.model_class](module, model, size, references, gen, device)
    return {kind: {**states, **conditioning[kind], **model.fixed_inputs[kind]} for kind in conditioning}


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


def measure_blocks(model: BlockModel, size: tuple[int, int], references: int, dtypes: tuple[str, ...], warmup: int,
                   iters: int, device: torch.device, peaks: dict[str, float | None], sm: int | None,
                   seed: int = 0) -> dict:
    """Per dtype: each block's result (block_result), or {"skipped": why} / {"error": what broke}; the step and edit
    extrapolations are the caller's. peaks: dense TFLOP/s per dtype (None: no MFU)."""
    module = build_model(model, device, seed)
    inputs = block_inputs(module, model, size, references, device, seed)
    blocks = {"double": module.transformer_blocks[0], "single": module.single_transformer_blocks[0]}
    tokens = edit_tokens(model, *size, references)
    flops = step_block_flops(model.config, tokens["target"], tokens["context"], tokens["text"], 1)
    reference = {kind: time_block(block, inputs[kind], 0, 1, device)[1] for kind, block in blocks.items()}
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
                seconds, delta = time_block(block, inputs[kind], warmup, iters, device)
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
