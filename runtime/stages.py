"""The five stages and their I/O contract: every backend maps named tensors in to named tensors out.

Names follow the diffusers/BFL (and TensorRT demoDiffusion) convention, so engines built from BFL's
published ONNX run unchanged. Shapes (B batch, N target tokens, M context tokens, h/w latent size):

| stage       | inputs                                                        | outputs                       |
|-------------|---------------------------------------------------------------|-------------------------------|
| clip        | input_ids int64 (B, 77)                                        | text_embeddings (B, 77, Dc), pooled_embeddings (B, Dc) |
| t5          | input_ids int64 (B, 512)                                       | text_embeddings (B, 512, Dt)  |
| vae_encoder | images (B, 3, 8h, 8w) in [-1, 1]                               | latent (B, 16, h, w): posterior mean, unscaled |
| vae_decoder | latent (B, 16, h, w), unscaled                                 | images (B, 3, 8h, 8w) in [-1, 1] |
| transformer | hidden_states (B, N+M, 64), encoder_hidden_states (B, 512, Dt), pooled_projections (B, Dc), timestep (B,) in [0, 1], img_ids (N+M, 3), txt_ids (512, 3), guidance (B,) | latent (B, N+M, 64) |

The loop hands float inputs over as float32 (ids and timestep stay float32); each adapter casts to the
dtype its backend wants and may return outputs in its own dtype.
"""
from __future__ import annotations

from typing import Protocol

import torch

STAGE_NAMES = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder")

STAGE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clip": (("input_ids",), ("text_embeddings", "pooled_embeddings")),
    "t5": (("input_ids",), ("text_embeddings",)),
    "vae_encoder": (("images",), ("latent",)),
    "vae_decoder": (("latent",), ("images",)),
    "transformer": (
        ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"),
        ("latent",),
    ),
}


class Stage(Protocol):
    """A stage: named tensors in, named tensors out."""

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...
