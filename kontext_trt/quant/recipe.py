"""What gets quantized to what: the precisions, the ONE exclusion table, and the ModelOpt calibration config.

Only nn.Linear layers and (optionally) the attention matmuls are quantized. Norms (LayerNorm, the q/k RMSNorms), RoPE
(float32, see export/rope.py), GELU, softmax's exponent and the residual adds always stay in the graph dtype.

| precision | linear weights                     | linear inputs                                   | attention |
|-----------|------------------------------------|-------------------------------------------------|-----------|
| fp8       | E4M3, one scale per tensor         | E4M3, one calibrated scale per tensor           | bf16      |
| nvfp4     | E2M1, E4M3 scale per 16, one float | E2M1, E4M3 scale per 16 (dynamic), one float    | fp8       |

(attention: the default; --attention picks fp8 or bf16 for either precision.)

A layer whose input width does not fit its format's block (NVFP4: 16) takes the next format down (fp8, else the
graph dtype); the recipe lists every such layer with its reason, and so does the quality report.

SVDQuant (nvfp4 with svd_rank > 0, the default rank 32): every NVFP4 layer runs y = (x/s) L1 L2 + nvfp4(x/s) R^T with
a per-input-channel smoothing s from calibration (quant/svdquant.py); svd_rank 0 is plain NVFP4.

FP8 attention quantizes q (pre-multiplied by 1/sqrt(d)), k, v with calibrated per-tensor scales and the softmax output
with the fixed scale 1/448 (it lies in [0, 1]); this is ModelOpt's and demoDiffusion's FP8 MHA for Flux. FLUX.1's
FluxAttention and FLUX.2 [klein]'s Flux2Attention and Flux2ParallelSelfAttention have it (FP8_ATTENTION).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from kontext_trt.core.errors import KontextError

FORMAT_VERSION = 1
PRECISIONS = ("fp8", "nvfp4")
DEFAULT_SVD_RANK = 32  # NVIDIA's FP4 Kontext ONNX and ModelOpt's NVFP4_SVDQUANT_DEFAULT_CFG use rank 32
WIDTH_MULTIPLE = {"nvfp4": 16, "fp8": 1}  # input width a format's quantizer needs (NVFP4: whole 16-element blocks)
NEXT_DOWN = {"nvfp4": "fp8", "fp8": None}
ATTENTIONS = ("fp8", "bf16")
DEFAULT_ATTENTION = {"fp8": "bf16", "nvfp4": "fp8"}

# The ONE place that keeps layers out of the requested format: (full-name regex, format kept, reason).
# None keeps the layer in the graph dtype (bf16); "fp8" caps it at FP8 when NVFP4 is asked for.
EXCLUSIONS: tuple[tuple[str, str | None, str], ...] = (
    (r"x_embedder", None, "first layer (64 packed latent channels in): its error reaches every image token of every "
                          "block; kept by ModelOpt's Flux filter and demoDiffusion"),
    (r"context_embedder", None, "T5 features in: its error reaches every text token; kept by both references"),
    (r"time_text_embed\..+", None, "timestep, guidance and pooled-CLIP embedders: one row per image (nothing to speed "
                                   "up) that conditions every block; kept by both references"),
    (r"norm_out\.linear", None, "final AdaLN modulation: scales the output directly; kept by both references"),
    (r"proj_out", None, "final projection to the 64 latent channels, its error is the velocity error; kept by both "
                        "references (the single blocks' proj_out is quantized)"),
    (r".+\.(norm1|norm1_context|norm)\.linear", "fp8", "AdaLN modulation (shift, scale, gate of every block): one row "
                                                       "per image, so 4-bit buys no speed, while its 4-bit error lands "
                                                       "on every token's scale and gate; FP8 keeps its memory halved"),
)
# FLUX.2 [klein]'s Flux2Transformer2DModel, the same reasoning on its names: its AdaLN modulation is shared by all
# double (image, text) and all single blocks, its embedders are bias-free linears.
KLEIN_EXCLUSIONS: tuple[tuple[str, str | None, str], ...] = (
    (r"x_embedder", None, "first layer (the packed latent channels in): its error reaches every image token"),
    (r"context_embedder", None, "stacked Qwen3 features in: its error reaches every text token"),
    (r"time_guidance_embed\..+", None, "timestep embedder: one row per image that conditions every block"),
    (r"norm_out\.linear", None, "final AdaLN modulation: scales the output directly"),
    (r"proj_out", None, "final projection to the latent channels, its error is the velocity error"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear", "fp8",
     "AdaLN modulation shared by every block: one row per image, so 4-bit buys no speed, while its error lands on "
     "every token's scale and gate; FP8 keeps its memory halved"),
)
FAMILY_EXCLUSIONS = {"flux1-kontext": EXCLUSIONS, "flux2-klein": KLEIN_EXCLUSIONS}
# family -> the diffusers attention module classes whose matmuls FP8 attention quantizes (qmodel.FP8_PROCESSORS holds
# each class's processor): FLUX.1's FluxAttention; klein's Flux2Attention (double blocks) and
# Flux2ParallelSelfAttention (single blocks). A family not listed quantizes its linears only (--attention bf16).
FP8_ATTENTION = {"flux1-kontext": ("FluxAttention",), "flux2-klein": ("Flux2Attention", "Flux2ParallelSelfAttention")}


@dataclass
class Recipe:
    """A quantization as saved in DIR/quant/recipe.json: settings, per-layer formats and where it came from."""

    precision: str
    attention: str
    layers: dict[str, str | None]  # every nn.Linear of the transformer: "fp8", "nvfp4" or None (graph dtype)
    attention_layers: list[str]  # attention modules whose matmuls are FP8 (empty for --attention bf16)
    checkpoint: dict = field(default_factory=dict)  # {"path", "fingerprint"}
    calibration: dict = field(default_factory=dict)  # {"source", "size", "steps", "auto_resize", "pairs"}
    exclusions: list = field(default_factory=lambda: [list(e) for e in EXCLUSIONS])
    loras: list = field(default_factory=list)  # [[file, scale]]: LoRAs fused into the weights before calibration
    narrowed: dict = field(default_factory=dict)  # layer -> why it runs below the format the exclusions give it
    svd_rank: int = 0  # SVDQuant low-rank branch of every NVFP4 layer; 0: plain NVFP4
    svd_alpha: float | None = None  # smoothing migration strength; None: searched per layer (0, 0.1, .., 1)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """The inverse of to_dict."""
        return cls(**data)


def check_precision(precision: str, attention: str | None, family: str = "flux1-kontext", label: str = "") -> str:
    """Refuse unknown precision or attention names, and FP8 attention for a family without it, in one line; the
    attention format to use (the family's default when none is asked)."""
    if precision not in PRECISIONS:
        raise KontextError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if attention == "fp8" and family not in FP8_ATTENTION:
        raise KontextError(f"--attention fp8: a {label or family} transformer has no FP8 attention here; it quantizes "
                           "its linear layers only: use --attention bf16 (the default)")
    attention = attention or (DEFAULT_ATTENTION[precision] if family in FP8_ATTENTION else "bf16")
    if attention not in ATTENTIONS:
        raise KontextError(f"unknown attention precision {attention!r}: use {' or '.join(ATTENTIONS)}")
    return attention


def check_svd(precision: str, svd_rank: int | None, svd_alpha: float | None) -> int:
    """Refuse SVDQuant settings that cannot apply in one line; the rank to use (default 32 for nvfp4, 0 for fp8)."""
    if svd_alpha is not None and not 0 <= svd_alpha <= 1:
        raise KontextError(f"--svd-alpha must lie in [0, 1] (0: no activation smoothing), got {svd_alpha}")
    if svd_rank is None:
        return DEFAULT_SVD_RANK if precision == "nvfp4" else 0
    if svd_rank < 0:
        raise KontextError(f"--svd-rank must be 0 (plain NVFP4) or more, got {svd_rank}")
    if svd_rank > 0 and precision != "nvfp4":
        raise KontextError(f"--svd-rank {svd_rank}: SVDQuant is an nvfp4 recipe; drop --svd-rank for {precision}")
    return svd_rank


def layer_format(name: str, precision: str, exclusions: tuple = EXCLUSIONS) -> str | None:
    """The format of one linear layer: the first exclusion that matches its full name, else the precision."""
    for pattern, kept, _ in exclusions:
        if re.fullmatch(pattern, name):
            return None if kept is None else kept if precision == "nvfp4" else precision
    return precision


def fit_width(fmt: str | None, in_features: int) -> tuple[str | None, str]:
    """The first of fmt, its next formats down, whose block fits the input width; why it moved ('' when it did not)."""
    kept = fmt
    while kept is not None and in_features % WIDTH_MULTIPLE[kept]:
        kept = NEXT_DOWN[kept]
    if kept == fmt:
        return fmt, ""
    return kept, (f"{fmt} -> {kept or 'bf16'}: input width {in_features} is not a multiple of {fmt}'s "
                  f"{WIDTH_MULTIPLE[fmt]}-element block")


def make_recipe(transformer: nn.Module, precision: str, attention: str, svd_rank: int = 0,
                svd_alpha: float | None = None, family: str = "flux1-kontext") -> Recipe:
    """Every linear layer's format (the family's exclusions) and the attention modules to quantize, for a
    FluxTransformer2DModel or a Flux2Transformer2DModel."""
    modules, exclusions = list(transformer.named_modules()), FAMILY_EXCLUSIONS[family]
    layers, narrowed = {}, {}
    for name, m in modules:
        if isinstance(m, nn.Linear):
            layers[name], why = fit_width(layer_format(name, precision, exclusions), m.in_features)
            if why:
                narrowed[name] = why
    kinds = FP8_ATTENTION.get(family, ()) if attention == "fp8" else ()
    attn = [name for name, m in modules if type(m).__name__ in kinds]
    return Recipe(precision, attention, layers, attn, exclusions=[list(e) for e in exclusions], narrowed=narrowed,
                  svd_rank=svd_rank, svd_alpha=svd_alpha)


def svd_layers(recipe: Recipe) -> list[str]:
    """The layers with an SVDQuant branch: every NVFP4 layer when svd_rank > 0."""
    return [name for name, fmt in recipe.layers.items() if fmt == "nvfp4"] if recipe.svd_rank > 0 else []


MODELOPT_FORMATS = {
    "fp8": {"num_bits": (4, 3), "axis": None},
    "nvfp4": {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
}


def modelopt_config(recipe: Recipe) -> dict:
    """The mtq.quantize config that calibrates (max) exactly the inputs the recipe quantizes.

    Weights need no calibration (their scales come from the weights), so only input and q/k/v quantizers are on.
    """
    cfg = [{"quantizer_name": "*", "enable": False}]
    cfg += [{"quantizer_name": f"{name}.input_quantizer", "cfg": MODELOPT_FORMATS[fmt]}
            for name, fmt in recipe.layers.items() if fmt]
    cfg += [{"quantizer_name": f"{name}.{q}_bmm_quantizer", "cfg": MODELOPT_FORMATS["fp8"]}
            for name in recipe.attention_layers for q in "qkv"]
    return {"quant_cfg": cfg, "algorithm": "max"}
