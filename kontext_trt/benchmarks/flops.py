"""Analytic FLOP model of one FLUX/Kontext transformer step, from its diffusers config and token counts.

Counts the matrix-multiply work (2 FLOP per multiply-add) that tensor cores do: every nn.Linear of the
embedders, the 19 double-stream and 38 single-stream blocks, the adaLN modulations and the output
projection, and attention's two products (QK^T and PV: 4 * L^2 * hidden per block and sample). Elementwise
work (RoPE, RMS/LayerNorm, softmax, GELU, gating, residuals) is left out, as torch's FlopCounterMode and
the usual MFU convention leave it out; it is below 1% of the total at real sizes (softmax ~1% of attention).
The sequence inside every block is [text T | target N | context M], L = T + N + M.

FLUX.2 [klein] (diffusers' Flux2Transformer2DModel, chosen by the config's _class_name): no biases, no pooled text, no
guidance embedding in klein; the modulations are shared (one image and one text modulation for all double blocks,
one for all single blocks), the MLPs are SwiGLU (d -> 2h -> h -> d, h = mlp_ratio d) and a single block fuses q, k, v
and the MLP input into one d -> 3d + 2h projection and [attn | mlp] -> d out. The SVDQuant part is FLUX.1's only (0).

SVDQuant (svd_rank r > 0, quant/svdquant.py) adds a bf16 low-rank branch to every NVFP4 layer of the blocks (q, k, v,
out and the MLPs of both streams; q, k, v, MLP in and out of the single blocks; not the modulations): 2 r (d_in + d_out)
FLOP per token per layer, the "svdquant" part.
"""
from __future__ import annotations

# diffusers' FluxTransformer2DModel defaults: the real FLUX.1 widths.
DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True}
TIMESTEP_CHANNELS = 256  # sinusoidal width fed to the timestep and guidance MLPs
MLP_RATIO = 4


def linear(n_in: int, n_out: int, rows: int) -> int:
    """FLOP of a dense layer applied to `rows` vectors."""
    return 2 * n_in * n_out * rows


def branch(n_in: int, n_out: int, rank: int) -> int:
    """FLOP per token of a rank-r low-rank branch n_in -> r -> n_out (rank capped at the layer's widths)."""
    return 2 * min(rank, n_in, n_out) * (n_in + n_out)


def _block_parts(d: int, seq: int) -> tuple[int, int, int]:
    """Per block and sample: the double block's linear FLOP, the single block's and one attention's (QK^T and PV)."""
    # double block: adaLN-Zero (6d) for each stream; q, k, v, out and a 4x MLP for each stream on its own tokens
    double = 2 * linear(d, 6 * d, 1) + linear(d, d, 4 * seq) + 2 * linear(d, MLP_RATIO * d, seq)
    # single block: adaLN (3d); q, k, v and the MLP in on all tokens; out projection from [attn | mlp] = 5d
    single = (linear(d, 3 * d, 1) + linear(d, d, 3 * seq) + linear(d, MLP_RATIO * d, seq)
              + linear((1 + MLP_RATIO) * d, d, seq))
    return double, single, 4 * seq * seq * d


def _config(config: dict) -> dict:
    """diffusers' defaults overlaid with the config's entries the model reads."""
    return {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}


def block_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
                batch: int = 1) -> dict[str, int]:
    """FLOP of ONE double-stream and ONE single-stream block, each with its own attention (QK^T and PV):
    {"double", "single"}. num_layers * double + num_single_layers * single is transformer_flops' double + single +
    attention for the same tokens."""
    c = _config(config)
    double, single, attention = _block_parts(c["num_attention_heads"] * c["attention_head_dim"],
                                             text_tokens + target_tokens + context_tokens)
    return {"double": batch * (double + attention), "single": batch * (single + attention)}


def transformer_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
                      batch: int = 1, svd_rank: int = 0) -> dict[str, int]:
    """FLOP of one transformer forward, split into embed, double, single, attention, out, svdquant and total."""
    c = _config(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    channels_in = c["in_channels"]
    channels_out = c["patch_size"] ** 2 * (c["out_channels"] or channels_in)
    image = target_tokens + context_tokens
    seq = text_tokens + image
    time_mlps = 2 if c["guidance_embeds"] else 1
    embed = (linear(channels_in, d, image) + linear(c["joint_attention_dim"], d, text_tokens)
             + time_mlps * (linear(TIMESTEP_CHANNELS, d, 1) + linear(d, d, 1))
             + linear(c["pooled_projection_dim"], d, 1) + linear(d, d, 1))
    double, single, attention = _block_parts(d, seq)
    out = linear(d, 2 * d, 1) + linear(d, channels_out, image)
    # SVDQuant branch x -> r -> n_out of each NVFP4 layer: double (per stream: 4 d->d, d->4d, 4d->d), single
    # (3 d->d, d->4d, 5d->d); each layer runs on its stream's tokens
    r = svd_rank
    double_svd = (4 * branch(d, d, r) + 2 * branch(d, MLP_RATIO * d, r)) * seq
    single_svd = (3 * branch(d, d, r) + branch(d, MLP_RATIO * d, r) + branch((1 + MLP_RATIO) * d, d, r)) * seq
    parts = {"embed": embed, "double": c["num_layers"] * double, "single": c["num_single_layers"] * single,
             "attention": (c["num_layers"] + c["num_single_layers"]) * attention, "out": out,
             "svdquant": c["num_layers"] * double_svd + c["num_single_layers"] * single_svd}
    parts = {name: batch * value for name, value in parts.items()}
    return {**parts, "total": sum(parts.values())}


# diffusers' Flux2Transformer2DModel defaults overlaid by FLUX.2 [klein] 4B's published config (docs/klein.md).
KLEIN_4B = {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
            "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
            "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": False}
KLEIN_9B = {**KLEIN_4B, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
            "joint_attention_dim": 12288}


def _flux2_block_parts(c: dict, seq: int) -> tuple[int, int, int]:
    """Per klein block and sample: the double block's linear FLOP, the single block's and one attention's (the shared
    modulations run outside the blocks)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    h = int(d * c["mlp_ratio"])
    double = linear(d, d, 4 * seq) + linear(d, 2 * h, seq) + linear(h, d, seq)
    single = linear(d, 3 * d + 2 * h, seq) + linear(d + h, d, seq)
    return double, single, 4 * seq * seq * d


def flux2_block_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
                      batch: int = 1) -> dict[str, int]:
    """block_flops for Flux2Transformer2DModel: ONE double and ONE single klein block, each with its attention."""
    double, single, attention = _flux2_block_parts({**KLEIN_4B, **config}, text_tokens + target_tokens + context_tokens)
    return {"double": batch * (double + attention), "single": batch * (single + attention)}


def flux2_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
                batch: int = 1) -> dict[str, int]:
    """FLOP of one Flux2Transformer2DModel forward (FLUX.2 [klein]), split as transformer_flops splits FLUX.1's."""
    c = {**KLEIN_4B, **config}
    d = c["num_attention_heads"] * c["attention_head_dim"]
    channels_out = c["patch_size"] ** 2 * (c["out_channels"] or c["in_channels"])
    image = target_tokens + context_tokens
    seq = text_tokens + image
    time_mlps = 2 if c["guidance_embeds"] else 1  # the transformer's guidance embedder (klein: none)
    embed = (linear(c["in_channels"], d, image) + linear(c["joint_attention_dim"], d, text_tokens)
             + time_mlps * (linear(c["timestep_guidance_channels"], d, 1) + linear(d, d, 1))
             + 2 * linear(d, 6 * d, 1) + linear(d, 3 * d, 1))  # the shared double (image, text) and single modulations
    double, single, attention = _flux2_block_parts(c, seq)
    parts = {"embed": embed, "double": c["num_layers"] * double, "single": c["num_single_layers"] * single,
             "attention": (c["num_layers"] + c["num_single_layers"]) * attention,
             "out": linear(d, 2 * d, 1) + linear(d, channels_out, image), "svdquant": 0}
    parts = {name: batch * value for name, value in parts.items()}
    return {**parts, "total": sum(parts.values())}


def step_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
               batch: int = 1) -> dict[str, int]:
    """One transformer forward's FLOP by the model its config names: Flux2Transformer2DModel (klein) or FLUX.1's."""
    model = flux2_flops if is_flux2(config) else transformer_flops
    return model(config, target_tokens, context_tokens, text_tokens, batch)


def step_block_flops(config: dict, target_tokens: int, context_tokens: int = 0, text_tokens: int = 512,
                     batch: int = 1) -> dict[str, int]:
    """One double and one single block's FLOP by the model its config names (as step_flops chooses)."""
    model = flux2_block_flops if is_flux2(config) else block_flops
    return model(config, target_tokens, context_tokens, text_tokens, batch)


def is_flux2(config: dict) -> bool:
    """Whether a transformer config is a Flux2Transformer2DModel's (FLUX.2 [klein]) rather than FLUX.1's."""
    return config.get("_class_name") == KLEIN_4B["_class_name"]


def achieved(flops: float, seconds: float, peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s and the fraction of a dense peak (MFU; None without a peak, as on CPU)."""
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "peak_tflops": peak_tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
