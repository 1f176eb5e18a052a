"""FP8 (E4M3) and NVFP4 emulated in float32, written from the format definitions (no ModelOpt kernel involved).

E4M3FN: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals, no infinities, largest magnitude 448.
E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7, bit 3 is
the sign. NVFP4 quantizes the last axis in blocks of 16 with two scales: a per-tensor float g = amax / (6 * 448)
and per block s = E4M3(block_amax / 6 / g); a value is stored as E2M1(x / (s * g)) and read back as code * s * g.
Every rounding is to nearest with ties to even, saturating at the largest magnitude (ONNX QuantizeLinear saturate=1).
A block whose scale rounds to 0 (all zeros, or underflow) reads back as zeros.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
BLOCK = 16
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7
NVFP4_MAX = E2M1_MAX * E4M3_MAX  # per-tensor scale g = amax / NVFP4_MAX
MIN_AMAX = 1e-6  # an all-zero calibrated input still gets a finite, non-zero scale
INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> float8_e4m3fn, nearest-even, saturating at +-448 (torch's cast alone turns > 464 into NaN)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """float -> E2M1 codes (uint8, 0..15), nearest-even on the grid, saturating at +-6."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))  # grid spacing of each binade
    mag = torch.round(a / step) * step  # torch.round is half-to-even; the grid index parity is the mantissa bit
    index = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4))
    return (index.to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> float32 values."""
    grid = torch.tensor(E2M1_GRID, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes -> (..., K/2) bytes, the first of each pair in the low nibble (ONNX FLOAT4E2M1 layout)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) codes; the inverse of pack_e2m1."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def scale_for(amax: torch.Tensor | float, max_code: float, dtype: torch.dtype) -> torch.Tensor:
    """0-d scale amax / max_code (float32 division, as ModelOpt) stored in dtype, rounded up where dtype is narrower,
    so the calibrated amax does not saturate (bf16 rounding down would clip the top 0.4% of the range)."""
    exact = torch.as_tensor(amax, dtype=torch.float32).clamp(min=MIN_AMAX) / max_code
    stored = exact.to(dtype)
    if stored.float() < exact:  # next representable value up: a positive float's bit pattern plus one
        stored = (stored.view(INT_OF[dtype]) + 1).view(dtype)
    return stored


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8: E4M3(x / scale) * scale, back in x's dtype."""
    s = scale.float()
    return (round_e4m3(x.float() / s).float() * s).to(x.dtype)


def nvfp4_quantize(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> E2M1 codes (..., K) uint8 and E4M3 block scales (..., K/16), per-tensor scale given."""
    g = scale.float()
    blocks = x.float().unflatten(-1, (-1, BLOCK))  # (..., K/16, 16)
    block_scale = round_e4m3(blocks.abs().amax(-1) / E2M1_MAX / g)  # (..., K/16)
    s = block_scale.float()[..., None] * g
    codes = e2m1_codes(torch.where(s > 0, blocks / torch.where(s > 0, s, 1.0), 0.0))
    return codes.flatten(-2), block_scale


def nvfp4_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """codes * (block scale * per-tensor scale), each product rounded to dtype as the two ONNX DequantizeLinear do."""
    s = (block_scale.float() * scale.float()).to(dtype).float()[..., None]  # (..., K/16, 1)
    values = e2m1_values(codes).unflatten(-1, (-1, BLOCK))
    return (values * s).to(dtype).flatten(-2)


def nvfp4_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 round trip of x along its last axis (dynamic block scales), back in x's dtype."""
    codes, block_scale = nvfp4_quantize(x, scale)
    return nvfp4_dequantize(codes, block_scale, scale, x.dtype)
