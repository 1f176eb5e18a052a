"""RoPE for export: the FLUX position embedding computed in float32 inside the graph, from img_ids and txt_ids.

diffusers' FluxPosEmbed computes the rotary tables in float64 on the CPU, and TensorRT has no float64, so the
exported transformer swaps it for Fp32RoPE: the per-axis frequencies are folded (in float64, at export time) into
one float32 constant, and the angles, cos and sin are float32 ops in the graph. The error against the float64
tables is ~1e-6 rad at Kontext positions (< 100), far below bf16's resolution of the values it rotates.

Why compute RoPE in the graph rather than feed cos/sin as engine inputs:
- TensorRT fuses attention on Q, K and V (IAttention, from the ONNX `Attention` op of opset >= 23, or the
  MatMul-Softmax-MatMul pattern at lower opsets); the rotation is an elementwise op on Q and K *before* the
  first BMM, so it sits outside the fused region either way (TensorRT folds such elementwise chains into
  pointwise kernels). Where cos/sin come from does not change the attention fusion.
- The tables are (text + image tokens, 128) computed once per forward from 3 id columns, shared by all 57 blocks:
  a few microseconds, while feeding them would add two (L, 128) inputs per step and break BFL's / demoDiffusion's
  engine I/O (img_ids, txt_ids), which our runtime and stages.STAGE_IO keep.
- The angle must be float32: positions reach ~100 rad, where bf16 would be off by ~0.5 rad. The graph casts the
  ids to float32 and keeps the tables float32 even in a bf16 export (strongly typed TensorRT obeys those types);
  the rotation itself is done in float32 and cast back, as diffusers' apply_rotary_emb does.
"""
from __future__ import annotations

import torch
from torch import nn


class Fp32RoPE(nn.Module):
    """FluxPosEmbed in float32: ids (S, 3) -> (cos, sin), each (S, sum(axes_dim)), pairs interleaved."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        freqs = [theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dim]
        axis = [torch.full((d // 2,), i) for i, d in enumerate(axes_dim)]
        self.register_buffer("freqs", torch.cat(freqs).float(), persistent=False)  # (D/2,)
        self.register_buffer("axis", torch.cat(axis), persistent=False)  # (D/2,) which id column each freq reads

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = ids.float()[:, self.axis] * self.freqs  # (S, D/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([cos, cos], -1).flatten(1), torch.stack([sin, sin], -1).flatten(1)  # (S, D)


def fp32_rope(transformer: nn.Module) -> nn.Module:
    """Swap a FluxTransformer2DModel's float64 FluxPosEmbed for Fp32RoPE, in place; returns the transformer."""
    pos = transformer.pos_embed
    transformer.pos_embed = Fp32RoPE(pos.theta, tuple(pos.axes_dim))
    return transformer
