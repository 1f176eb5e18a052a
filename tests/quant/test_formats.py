"""The FP8 / NVFP4 emulation, checked bit-exactly against reference code written from the format definitions, and
against ModelOpt where ModelOpt runs on the CPU (FP8 fake quantization, NVFP4 weight quantization)."""
import math
import struct

import pytest
import torch

from kontext_trt.quant import formats


def e4m3_value(code: int) -> float:
    """E4M3FN decoded from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign, exp, man = code >> 7, (code >> 3) & 15, code & 7
    if exp == 15 and man == 7:
        return math.nan
    mag = man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return -mag if sign else mag


def e2m1_value(code: int) -> float:
    """E2M1 decoded from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
    return -mag if sign else mag


def nearest_even(x: list[float], n_codes: int, value, max_mag: float) -> list[int]:
    """For each x the code of the nearest value (x saturated at +-max_mag), ties to the even code (mantissa LSB 0).

    Only finite codes take part, and +0 stands for zero (the sign of a zero is not compared)."""
    codes = [c for c in range(n_codes) if not math.isnan(value(c)) and (value(c) != 0 or c == 0)]
    values = torch.tensor([value(c) for c in codes], dtype=torch.float64)
    even = torch.tensor([c % 2 == 0 for c in codes])
    d = (torch.tensor(x, dtype=torch.float64).clamp(-max_mag, max_mag)[:, None] - values).abs()
    nearest = d == d.min(dim=1, keepdim=True).values
    pick = torch.where((nearest & even).any(1), (nearest & even).int().argmax(1), nearest.int().argmax(1))
    return [codes[i] for i in pick.tolist()]


def f32(x: float) -> float:
    """x rounded to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def test_e2m1_grid_is_the_definition():
    assert [e2m1_value(c) for c in range(8)] == list(formats.E2M1_GRID)
    codes = torch.arange(16, dtype=torch.uint8)
    assert formats.e2m1_values(codes).tolist() == [e2m1_value(c) for c in range(16)]
    values = torch.tensor([e2m1_value(c) for c in range(16) if c != 8])  # -0 encodes as +0's magnitude, sign kept
    assert formats.e2m1_values(formats.e2m1_codes(values)).tolist() == values.tolist()


def test_e2m1_rounding_nearest_even_saturating():
    grid = [e2m1_value(c) for c in range(8)]
    midpoints = [(a + b) / 2 for a, b in zip(grid, grid[1:])]  # 0.25 0.75 1.25 1.75 2.5 3.5 5: the ties
    near = [m + d for m in midpoints for d in (-1e-3, 1e-3)]
    x = torch.tensor(midpoints + near + [6.5, 100.0, 1e-8] + torch.linspace(-7, 7, 301).tolist())
    x = torch.cat([x, -x])
    got = formats.e2m1_codes(x)
    want = nearest_even(x.tolist(), 16, e2m1_value, 6.0)
    got_values = formats.e2m1_values(got).tolist()
    assert got_values == [e2m1_value(c) for c in want]  # same values; -0 vs +0 only differs in the sign bit
    assert formats.e2m1_codes(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == [0, 2, 2, 4, 4, 6, 6]


def test_e4m3_rounding_nearest_even_saturating():
    finite = sorted({e4m3_value(c) for c in range(128) if not math.isnan(e4m3_value(c))})
    ties = [(a + b) / 2 for a, b in zip(finite, finite[1:])]
    torch.manual_seed(0)
    x = torch.tensor(ties + [f32(t * (1 + 1e-6)) for t in ties] + [449.0, 470.0, 1e6, 2.0 ** -10, 2.0 ** -11]
                     + (torch.randn(4000) * 30).tolist() + (torch.randn(2000) * 0.01).tolist())
    x = torch.cat([x, -x])
    got = formats.round_e4m3(x).view(torch.uint8).tolist()
    want = nearest_even(x.tolist(), 256, e4m3_value, 448.0)
    assert [e4m3_value(c) for c in got] == [e4m3_value(c) for c in want]


def reference_nvfp4(x: list[float], amax: float) -> tuple[list[int], list[int], float]:
    """NVFP4 of one row from the definition: g = amax/(6*448), s = E4M3(block_amax/6/g), code = E2M1(x/(s*g))."""
    g = f32(amax / (6 * 448))
    codes, scales = [], []
    for i in range(0, len(x), 16):
        block = x[i:i + 16]
        s_code = nearest_even([f32(f32(max(map(abs, block)) / 6) / g)], 128, e4m3_value, 448.0)[0]
        s = f32(e4m3_value(s_code) * g)
        scales.append(s_code)
        codes += [0] * 16 if s == 0 else nearest_even([f32(v / s) for v in block], 16, e2m1_value, 6.0)
    return codes, scales, g


def test_nvfp4_quantize_bit_exact_with_definition():
    torch.manual_seed(1)
    x = torch.randn(3, 64) * torch.tensor([[0.1], [3.0], [50.0]])
    x[0, :16] = 0  # an all-zero block: scale 0, reads back as zeros
    x[1, 16:32] *= 1e-9  # underflows the E4M3 block scale
    amax = 20.0  # below row 2's values: an activation larger than calibrated saturates at +-6 * 448 * g
    g = torch.tensor(amax / (6 * 448), dtype=torch.float32)
    codes, block_scale = formats.nvfp4_quantize(x, g)
    for row in range(3):
        want_codes, want_scales, want_g = reference_nvfp4(x[row].tolist(), amax)
        assert g.item() == want_g
        assert block_scale[row].view(torch.uint8).tolist() == want_scales
        assert [e2m1_value(c) for c in codes[row].tolist()] == [e2m1_value(c) for c in want_codes]
    back = formats.nvfp4_dequantize(codes, block_scale, g, torch.float32)
    assert back[0, :16].abs().sum() == 0 and back.abs().max() <= 6 * 448 * g
    assert torch.equal(formats.nvfp4_qdq(x, g), back)


def test_fp4_packing_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = formats.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(formats.unpack_e2m1(packed), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_round_up_in_their_dtype(dtype):
    for amax in (1.3349, 0.0123, 7.77, 1000.0):
        for top in (formats.E4M3_MAX, formats.NVFP4_MAX):
            s = formats.scale_for(amax, top, dtype)
            assert s.dtype == dtype and s.float() <= amax / top * (1 + 2 ** -7)
            assert s.float() >= torch.tensor(amax) / top  # never below the float32 quotient: amax does not saturate


def test_nvfp4_weights_match_modelopt_bit_exactly():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1) * 3
    packed, block_scale, g = NVFP4QTensor.quantize(w.clone(), 16)
    assert g.item() == formats.scale_for(w.abs().max(), formats.NVFP4_MAX, torch.float32).item()
    codes, mine = formats.nvfp4_quantize(w, g)
    assert torch.equal(mine.view(torch.uint8), block_scale.view(torch.uint8))
    assert torch.equal(formats.pack_e2m1(codes), packed._quantized_data)


def test_fp8_matches_modelopt_fake_quant():
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    torch.manual_seed(0)
    x = torch.randn(64, 256) * 5
    amax = torch.tensor(12.0)  # some values saturate
    mine = formats.fp8_qdq(x, formats.scale_for(amax, formats.E4M3_MAX, torch.float32))
    theirs = fp8_eager(x, amax)  # x * (448 / amax), times 1 / (448 / amax): float32 ulps away from ours
    differ = ~torch.isclose(mine, theirs, rtol=1e-6, atol=0)  # a different E4M3 value, not just a last-bit scale
    assert differ.float().mean() < 1e-3
    step = (mine.abs() * 2 ** -3).clamp(min=2 ** -9 * 12 / 448)  # one E4M3 step near each value
    assert ((mine - theirs).abs() <= step * 1.01)[differ].all()
