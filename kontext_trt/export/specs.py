"""What each exported stage looks like: symbolic I/O shapes, the range of every dynamic dim, and trace inputs.

Shapes name their dynamic dims; a dim of an output may be an expression of input dims ("8*latent_height").
None stands for a static size read from the checkpoint (hidden widths; the T5 text length, KontextConfig.text_length:
512 for FLUX.1 Kontext [dev]). Ranges are min/opt/max, what a TensorRT optimization profile needs:

| dim            | min | opt  | max  | meaning                                                          |
|----------------|-----|------|------|------------------------------------------------------------------|
| batch          | 1   | 1    | 4    | prompts per call                                                 |
| image_tokens   | 16  | 8192 | 8300 | target + context tokens: 64x64 alone .. largest bucket twice     |
| height, width  | 64  | 1024 | 2048 | VAE encoder pixels (multiple of 8; the runtime uses 16)          |
| latent_height, latent_width | 8 | 128 | 256 | VAE decoder latent size (pixels / 8)                       |
"""
from __future__ import annotations

import torch

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


def stage_dims(stage: str) -> dict[str, DimRange]:
    """The dynamic dims a stage's inputs use."""
    names = {d for name in STAGE_IO[stage][0] for d in SHAPES[stage][name] if isinstance(d, str)}
    return {name: DIMS[name] for name in sorted(names)}


def sample_inputs(stage: str, transformer_config: dict, dtype: torch.dtype,
                  text_length: int) -> dict[str, torch.Tensor]:
    """Trace inputs inside every range, batch 2 (so no dim is 1 and none gets specialised); T5 text is text_length
    tokens (the checkpoint's KontextConfig.text_length: static in the graph)."""
    cfg, text = transformer_config, text_length
    width = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    parts = {"block_hidden_states": torch.randn(2, 48, width),
             "block_encoder_hidden_states": torch.randn(2, text, width),
             "temb": torch.randn(2, width), "final_hidden_states": torch.randn(2, 48, width),
             "img_ids": torch.rand(48, 3) * 8, "txt_ids": torch.zeros(text, 3)}
    floats = {
        "clip": {},
        "t5": {},
        "vae_encoder": {"images": torch.rand(2, 3, 128, 80) * 2 - 1},
        "vae_decoder": {"latent": torch.randn(2, 16, 16, 10)},
        "transformer": {"hidden_states": torch.randn(2, 48, cfg["in_channels"]),
                        "encoder_hidden_states": torch.randn(2, text, cfg["joint_attention_dim"]),
                        "pooled_projections": torch.randn(2, cfg["pooled_projection_dim"]),
                        "timestep": torch.full((2,), 0.5), "img_ids": torch.rand(48, 3) * 8,
                        "txt_ids": torch.zeros(text, 3), "guidance": torch.full((2,), 2.5)},
    }.get("transformer" if stage == "transformer_head" else stage, parts)  # body, tail: block-width tensors
    ids = {"clip": {"input_ids": torch.randint(0, 100, (2, CLIP_LEN))},
           "t5": {"input_ids": torch.randint(0, 100, (2, text))}}.get(stage, {})
    cast = {name: t if name in FP32_INPUTS else t.to(dtype) for name, t in floats.items()}
    return {name: {**ids, **cast}[name] for name in STAGE_IO[stage][0]}


def dynamic_shapes(stage: str) -> dict[str, dict[int, object] | None]:
    """torch.export dynamic_shapes for a stage's inputs: one torch.export.Dim per named dim, in its range."""
    made: dict[str, object] = {}

    def dim(name: str):
        if name not in made:
            r = DIMS[name]
            if r.multiple_of > 1:  # pixels = 8 * a latent-sized dim
                made[name] = VAE_FACTOR * torch.export.Dim(f"{name}_{VAE_FACTOR}", min=r.min // VAE_FACTOR,
                                                           max=r.max // VAE_FACTOR)
            else:
                made[name] = torch.export.Dim(name, min=r.min, max=r.max)
        return made[name]

    return {name: {i: dim(d) for i, d in enumerate(SHAPES[stage][name]) if isinstance(d, str)} or None
            for name in STAGE_IO[stage][0]}
