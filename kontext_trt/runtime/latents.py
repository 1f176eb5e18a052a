"""Latent layout: seeded noise, 2x2 packing and the [index, row, col] position ids."""
from __future__ import annotations

import torch


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of pack_latents for latent size (h, w)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_ids(h: int, w: int, index: int = 0) -> torch.Tensor:
    """(h/2 * w/2, 3) float32 ids [index, row, col] over the packed grid of a (h, w) latent."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.full_like(rows, index), rows, cols], dim=-1)
    return ids.reshape(-1, 3).float()


def text_ids(length: int) -> torch.Tensor:
    """(length, 3) zeros: text tokens carry no position in the RoPE grid."""
    return torch.zeros(length, 3)


def draw_noise(batch: int, channels: int, width: int, height: int, seed: int) -> torch.Tensor:
    """Gaussian noise (B, C, 2*(H//16), 2*(W//16)) drawn on the CPU from manual_seed(seed), as both references do."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, channels, 2 * (height // 16), 2 * (width // 16))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
