"""fp8 and nvfp4 stand-ins for nn.Linear over torch._scaled_mm, to time real-width blocks (benchmarks/gpu_blocks.py).

fp8: the weight is quantized once per tensor to float8_e4m3fn, the activation per tensor at every call (dynamic); one
_scaled_mm with the bias fused, bf16 out. nvfp4: NVFP4's two-level scaling on both operands (a float32 scale per tensor,
a float8_e4m3fn scale per 16 values along K, laid out in cuBLAS's 128x4 swizzled tiles), values in float4_e2m1fn_x2;
the two per-tensor scales and the bias are applied to the bf16 output. Attention and everything elementwise stay bf16.

The activation is quantized by plain torch ops, not a fused kernel, and that time is in every figure. The linears of
one block share a quantizer that reuses the last result when the same tensor comes again (q, k and v, and the single
block's MLP in, all read one normed input), as a fused QKV projection would quantize it once. Per-tensor fp8 scales
and NVFP4's per-tensor scales are powers of two, so applying them to bf16 tensors is exact.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
NVFP4_BLOCK = 16
ROWS_ALIGN = 16  # rows are zero-padded to this (the adaLN modulations run one row per sample)
TINY = 1e-12


def pow2_scale(amax: torch.Tensor, limit: float) -> torch.Tensor:
    """The smallest power of two s (float32) with amax / s <= limit."""
    amax = amax.float().clamp(min=TINY)
    scale = torch.exp2(torch.ceil(torch.log2(amax / limit)))
    return torch.where(amax / scale > limit, 2 * scale, scale)  # log2 rounded down at an exact power of two


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scale) with x ~= values * scale; |values| <= 448."""
    scale = pow2_scale(torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32), E4M3_MAX)
    return (x * (1.0 / scale).to(x.dtype)).to(torch.float8_e4m3fn), scale


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """(rows, K/16) block scales -> cuBLAS's swizzled layout: 128x4 tiles (zero padded), each stored as 32x16."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(row_tiles * 128, col_tiles * 4, dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = scales.view(torch.uint8)  # moved as bytes: float8 kernels are not needed for a copy
    tiles = padded.view(row_tiles, 128, col_tiles, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten().view(scales.dtype)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (uint8, sign in bit 3) of values already scaled into [-6, 6], rounded to the nearest."""
    boundaries = torch.tensor(E2M1_MIDPOINTS, device=v.device, dtype=v.dtype)
    magnitude = torch.bucketize(v.abs(), boundaries).to(torch.uint8)
    return magnitude | (torch.signbit(v).to(torch.uint8) << 3)


def nvfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (rows, K) tensor as NVFP4: (rows, K/2) packed e2m1 codes (uint8, element 2i in the low nibble),
    (rows, K/16) float8_e4m3fn block scales (not swizzled) and the float32 per-tensor scale; x ~= codes * block
    scale * tensor scale."""
    rows, k = x.shape
    blocks = x.float().view(rows, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    tensor_scale = pow2_scale(block_amax.amax(), E2M1_MAX * E4M3_MAX)
    block_scale = (block_amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = (block_scale.float() * tensor_scale).clamp(min=TINY).unsqueeze(-1)
    codes = e2m1_codes((blocks / step).clamp(-E2M1_MAX, E2M1_MAX)).view(rows, k)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), block_scale, tensor_scale


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The float32 values nvfp4_quantize's output stands for (to check it; the GEMM reads the packed form)."""
    magnitudes = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), device=packed.device)
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()
    values = magnitudes[codes & 7] * (1 - 2 * (codes >> 3)).float()
    scales = block_scale.float().repeat_interleave(NVFP4_BLOCK, dim=-1) * tensor_scale
    return values * scales


def scaled_mm(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    """torch._scaled_mm's product (torch before 2.4 returned it with an amax)."""
    out = torch._scaled_mm(a, b, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as a contiguous (rows, K) matrix, rows zero-padded to a multiple of ROWS_ALIGN, and the true row count."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows % ROWS_ALIGN:
        flat = torch.cat([flat, flat.new_zeros(ROWS_ALIGN - rows % ROWS_ALIGN, flat.shape[1])])
    return flat.contiguous(), rows


class SharedQuantizer:
    """Quantizes activations for the linears of one block as (rows, K) matrices (rows_of), reusing the last result
    when the same, unmodified tensor comes again; returns (the quantized operands, the true row count)."""

    def __init__(self, fn: Callable[[torch.Tensor], tuple]) -> None:
        self.fn, self.last, self.version, self.result = fn, None, -1, None

    def __call__(self, x: torch.Tensor) -> tuple[tuple, int]:
        if self.last is not x or self.version != x._version:
            flat, rows = rows_of(x)
            self.last, self.version, self.result = x, x._version, (self.fn(flat), rows)
        return self.result


class Fp8Linear(nn.Module):
    """nn.Linear in fp8: per-tensor weight scale, dynamic per-tensor activation scale, torch._scaled_mm."""

    def __init__(self, linear: nn.Linear, quantizer: SharedQuantizer) -> None:
        super().__init__()
        weight, scale = fp8_quantize(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in); passed transposed: column-major, as _scaled_mm wants
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.quantizer, self.out_features = quantizer, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (q, scale), rows = self.quantizer(x)
        out = scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                        out_dtype=x.dtype)
        return out[:rows].view(*x.shape[:-1], self.out_features)


class Nvfp4Linear(nn.Module):
    """nn.Linear in NVFP4 (Blackwell, sm100+): both operands in float4_e2m1fn_x2 with e4m3 block scales."""

    def __init__(self, linear: nn.Linear, quantizer: SharedQuantizer) -> None:
        super().__init__()
        packed, block_scale, tensor_scale = nvfp4_quantize(linear.weight.detach())
        self.register_buffer("weight", packed.view(torch.float4_e2m1fn_x2))
        self.register_buffer("weight_scale", to_blocked(block_scale))
        self.register_buffer("weight_tensor_scale", tensor_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.quantizer, self.out_features = quantizer, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (packed, block_scale, tensor_scale), rows = self.quantizer(x)
        out = scaled_mm(packed, self.weight.t(), scale_a=block_scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        out = out[:rows] * (tensor_scale * self.weight_tensor_scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def nvfp4_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation for Nvfp4Linear: packed values as float4_e2m1fn_x2, swizzled block scales, tensor scale."""
    packed, block_scale, tensor_scale = nvfp4_quantize(x)
    return packed.view(torch.float4_e2m1fn_x2), to_blocked(block_scale), tensor_scale


LINEARS = {"fp8": (Fp8Linear, fp8_quantize), "nvfp4": (Nvfp4Linear, nvfp4_activation)}


def quantize_linears(block: nn.Module, dtype: str) -> int:
    """Replace every nn.Linear of block, in place, by its fp8 or nvfp4 stand-in; returns how many were replaced."""
    cls, activation = LINEARS[dtype]
    quantizer = SharedQuantizer(activation)
    targets = [(name, module) for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, cls(module, quantizer))
    return len(targets)
