"""What each exported stage looks like, per model family: symbolic I/O shapes, the range of every dynamic dim, and trace
inputs.

Shapes name their dynamic dims; a dim of an output may be an expression of input dims ("8*latent_height").
None stands for a static size read from the checkpoint (hidden widths; the T5 text length, KontextConfig.text_length:
512 for FLUX.1 Kontext [dev]). Ranges are min/opt/max, what a TensorRT optimization profile needs. FLUX.1 Kontext:

| dim            | min | opt  | max  | meaning                                                          |
|----------------|-----|------|------|------------------------------------------------------------------|
| batch          | 1   | 1    | 4    | prompts per call                                                 |
| image_tokens   | 16  | 8192 | 8300 | target + context tokens: 64x64 alone .. largest bucket twice     |
| height, width  | 64  | 1024 | 2048 | VAE encoder pixels (multiple of 8; the runtime uses 16)          |
| latent_height, latent_width | 8 | 128 | 256 | VAE decoder latent size (pixels / 8)                       |

FLUX.2 [klein] (its stages and names: core.family; the VAE stages patchify, so a latent cell is 16 pixels):

| dim            | min | opt  | max   | meaning                                                         |
|----------------|-----|------|-------|-----------------------------------------------------------------|
| batch          | 1   | 1    | 4     | prompts per call                                                |
| image_tokens   | 16  | 8192 | 32768 | target + references: 64x64 alone .. a 2048x2048 target and 4 1 MP references |
| text_tokens    | 1   | 512  | 512   | Qwen3 tokens (the loop pads to 512)                             |
| height, width  | 64  | 1024 | 4096  | VAE pixels (multiple of 16; a 1 MP reference of aspect 8 is 2896 long) |
| latent_height, latent_width | 4 | 64 | 256 | VAE decoder input (pixels / 16)                         |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, Family
from kontext_trt.core.image import KONTEXT_BUCKETS, MAX_SIDE, MIN_SIDE
from kontext_trt.core.stages import STAGE_IO, DimRange
from kontext_trt.core.text import CLIP_LEN
from kontext_trt.runtime.torch_stages import FP32_INPUTS

Shape = tuple[int | str | None, ...]
MAX_BATCH = 4
VAE_FACTOR = 8
BUCKET_TOKENS = max((w // 16) * (h // 16) for w, h in KONTEXT_BUCKETS)  # 4150, at 800x1328


DIMS: dict[str, DimRange] = {
    "batch": DimRange(1, 1, MAX_BATCH),
    "image_tokens": DimRange((MIN_SIDE // 16) ** 2, 2 * (1024 // 16) ** 2, 2 * BUCKET_TOKENS),
    "height": DimRange(MIN_SIDE, 1024, MAX_SIDE, VAE_FACTOR),
    "width": DimRange(MIN_SIDE, 1024, MAX_SIDE, VAE_FACTOR),
    "latent_height": DimRange(MIN_SIDE // VAE_FACTOR, 1024 // VAE_FACTOR, MAX_SIDE // VAE_FACTOR),
    "latent_width": DimRange(MIN_SIDE // VAE_FACTOR, 1024 // VAE_FACTOR, MAX_SIDE // VAE_FACTOR),
}

SHAPES: dict[str, dict[str, Shape]] = {
    "clip": {"input_ids": ("batch", CLIP_LEN), "text_embeddings": ("batch", CLIP_LEN, None),
             "pooled_embeddings": ("batch", None)},
    "t5": {"input_ids": ("batch", None), "text_embeddings": ("batch", None, None)},
    "vae_encoder": {"images": ("batch", 3, "height", "width"), "latent": ("batch", None, "height/8", "width/8")},
    "vae_decoder": {"latent": ("batch", None, "latent_height", "latent_width"),
                    "images": ("batch", 3, "8*latent_height", "8*latent_width")},
    "transformer": {"hidden_states": ("batch", "image_tokens", None), "encoder_hidden_states": ("batch", None, None),
                    "pooled_projections": ("batch", None), "timestep": ("batch",), "img_ids": ("image_tokens", 3),
                    "txt_ids": (None, 3), "guidance": ("batch",), "latent": ("batch", "image_tokens", None)},
}
_TOKENS, _TEXT, _TEMB = ("batch", "image_tokens", None), ("batch", None, None), ("batch", None)
SHAPES["transformer_head"] = {**{name: SHAPES["transformer"][name] for name in STAGE_IO["transformer"][0]},
                              "block_hidden_states": _TOKENS, "block_encoder_hidden_states": _TEXT, "temb": _TEMB,
                              "first_block_residual": _TOKENS, "modulated_input": _TOKENS}
SHAPES["transformer_body"] = {"block_hidden_states": _TOKENS, "block_encoder_hidden_states": _TEXT, "temb": _TEMB,
                              "img_ids": ("image_tokens", 3), "txt_ids": (None, 3), "final_hidden_states": _TOKENS}
SHAPES["transformer_tail"] = {"final_hidden_states": _TOKENS, "temb": _TEMB, "latent": ("batch", "image_tokens", None)}


KLEIN_CELL = 16  # pixels per klein latent cell (VAE 8x, then the stages' 2x2 patchify)
KLEIN_SIDE = 4096
KLEIN_TOKENS = (1024 // KLEIN_CELL) ** 2  # 4096: a 1 MP image
KLEIN_DIMS: dict[str, DimRange] = {
    "batch": DimRange(1, 1, MAX_BATCH),
    "image_tokens": DimRange((MIN_SIDE // KLEIN_CELL) ** 2, 2 * KLEIN_TOKENS,
                             (MAX_SIDE // KLEIN_CELL) ** 2 + FLUX2_KLEIN.max_references * KLEIN_TOKENS),
    "text_tokens": DimRange(1, 512, 512),
    "height": DimRange(MIN_SIDE, 1024, KLEIN_SIDE, KLEIN_CELL),
    "width": DimRange(MIN_SIDE, 1024, KLEIN_SIDE, KLEIN_CELL),
    "latent_height": DimRange(MIN_SIDE // KLEIN_CELL, 1024 // KLEIN_CELL, KLEIN_SIDE // KLEIN_CELL),
    "latent_width": DimRange(MIN_SIDE // KLEIN_CELL, 1024 // KLEIN_CELL, KLEIN_SIDE // KLEIN_CELL),
}
KLEIN_SHAPES: dict[str, dict[str, Shape]] = {
    "text_encoder": {"input_ids": ("batch", "text_tokens"), "attention_mask": ("batch", "text_tokens"),
                     "text_embeddings": ("batch", "text_tokens", None)},
    "vae_encoder": {"images": ("batch", 3, "height", "width"), "latent": ("batch", None, "height/16", "width/16")},
    "vae_decoder": {"latent": ("batch", None, "latent_height", "latent_width"),
                    "images": ("batch", 3, "16*latent_height", "16*latent_width")},
    "transformer": {"hidden_states": ("batch", "image_tokens", None),
                    "encoder_hidden_states": ("batch", "text_tokens", None), "timestep": ("batch",),
                    "img_ids": ("image_tokens", 4), "txt_ids": ("text_tokens", 4),
                    "latent": ("batch", "image_tokens", None)},
}


def flux1_samples(stage: str, cfg: dict, text: int) -> dict[str, torch.Tensor]:
    """FLUX.1 Kontext trace inputs in fp32 (ids int64), batch 2; T5 text static at `text` tokens."""
    width = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    parts = {"block_hidden_states": torch.randn(2, 48, width),
             "block_encoder_hidden_states": torch.randn(2, text, width),
             "temb": torch.randn(2, width), "final_hidden_states": torch.randn(2, 48, width),
             "img_ids": torch.rand(48, 3) * 8, "txt_ids": torch.zeros(text, 3)}
    return {
        "clip": {"input_ids": torch.randint(0, 100, (2, CLIP_LEN))},
        "t5": {"input_ids": torch.randint(0, 100, (2, text))},
        "vae_encoder": {"images": torch.rand(2, 3, 128, 80) * 2 - 1},
        "vae_decoder": {"latent": torch.randn(2, 16, 16, 10)},
        "transformer": {"hidden_states": torch.randn(2, 48, cfg["in_channels"]),
                        "encoder_hidden_states": torch.randn(2, text, cfg["joint_attention_dim"]),
                        "pooled_projections": torch.randn(2, cfg["pooled_projection_dim"]),
                        "timestep": torch.full((2,), 0.5), "img_ids": torch.rand(48, 3) * 8,
                        "txt_ids": torch.zeros(text, 3), "guidance": torch.full((2,), 2.5)},
    }.get("transformer" if stage == "transformer_head" else stage, parts)  # body, tail: block-width tensors


def klein_samples(stage: str, cfg: dict, text: int) -> dict[str, torch.Tensor]:
    """FLUX.2 [klein] trace inputs in fp32 (ids int64), batch 2, 24 text tokens (the text length is dynamic)."""
    text, channels = 24, cfg["in_channels"]
    ids = torch.cat([torch.rand(48, 3) * 8, torch.zeros(48, 1)], dim=1)
    mask = torch.ones(2, text, dtype=torch.int64)
    mask[1, 20:] = 0
    return {
        "text_encoder": {"input_ids": torch.randint(0, 100, (2, text)), "attention_mask": mask},
        "vae_encoder": {"images": torch.rand(2, 3, 128, 80) * 2 - 1},
        "vae_decoder": {"latent": torch.randn(2, channels, 8, 5)},
        "transformer": {"hidden_states": torch.randn(2, 48, channels),
                        "encoder_hidden_states": torch.randn(2, text, cfg["joint_attention_dim"]),
                        "timestep": torch.full((2,), 0.5), "img_ids": ids,
                        "txt_ids": torch.stack([torch.zeros(text)] * 3 + [torch.arange(text).float()], dim=1)},
    }[stage]


@dataclass(frozen=True)
class FamilySpecs:
    """One family's export shapes, dim ranges and trace inputs."""

    shapes: dict[str, dict[str, Shape]]
    dims: dict[str, DimRange]
    samples: Callable[[str, dict, int], dict[str, torch.Tensor]]


SPECS = {FLUX1_KONTEXT.name: FamilySpecs(SHAPES, DIMS, flux1_samples),
         FLUX2_KLEIN.name: FamilySpecs(KLEIN_SHAPES, KLEIN_DIMS, klein_samples)}


def stage_dims(stage: str, family: Family = FLUX1_KONTEXT) -> dict[str, DimRange]:
    """The dynamic dims a stage's inputs use."""
    spec = SPECS[family.name]
    names = {d for name in family.io(stage)[0] for d in spec.shapes[stage][name] if isinstance(d, str)}
    return {name: spec.dims[name] for name in sorted(names)}


def sample_inputs(stage: str, transformer_config: dict, dtype: torch.dtype, text_length: int,
                  family: Family = FLUX1_KONTEXT) -> dict[str, torch.Tensor]:
    """Trace inputs inside every range, batch 2 (so no dim is 1 and none gets specialised); FLUX.1's T5 text is
    text_length tokens (the checkpoint's KontextConfig.text_length: static in the graph)."""
    floats = SPECS[family.name].samples(stage, transformer_config, text_length)
    cast = {name: t if name in FP32_INPUTS or not t.is_floating_point() else t.to(dtype) for name, t in floats.items()}
    return {name: cast[name] for name in family.io(stage)[0]}


def dynamic_shapes(stage: str, family: Family = FLUX1_KONTEXT) -> dict[str, dict[int, object] | None]:
    """torch.export dynamic_shapes for a stage's inputs: one torch.export.Dim per named dim, in its range (pixel dims
    as multiple_of times a latent-sized Dim)."""
    spec, made = SPECS[family.name], {}

    def dim(name: str):
        if name not in made:
            r = spec.dims[name]
            if r.multiple_of > 1:
                made[name] = r.multiple_of * torch.export.Dim(f"{name}_{r.multiple_of}", min=r.min // r.multiple_of,
                                                              max=r.max // r.multiple_of)
            else:
                made[name] = torch.export.Dim(name, min=r.min, max=r.max)
        return made[name]

    return {name: {i: dim(d) for i, d in enumerate(spec.shapes[stage][name]) if isinstance(d, str)} or None
            for name in family.io(stage)[0]}
