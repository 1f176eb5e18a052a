"""benchmarks/lowp_linear.py on the CPU: fp8 linears through torch._scaled_mm, and the NVFP4 encoding (values, block
scales and cuBLAS's swizzled scale layout) checked by decoding it; the NVFP4 GEMM itself needs sm100."""
import pytest
import torch
from torch import nn

from kontext_trt.benchmarks import lowp_linear as lp


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 384).to(torch.bfloat16)


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_fp8_scales_are_powers_of_two_and_values_in_range():
    x = torch.randn(64, 128, dtype=torch.bfloat16) * 37
    q, scale = lp.fp8_quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.log2(scale).item() == int(torch.log2(scale).item())
    values = q.float()
    assert values.abs().max().item() <= 448 and values.abs().max().item() > 224  # the whole e4m3 range is used
    assert rel(values * scale, x) < 0.05


def test_pow2_scale_at_an_exact_power_of_two():
    assert lp.pow2_scale(torch.tensor(448.0), 448.0).item() == 1.0
    assert lp.pow2_scale(torch.tensor(449.0), 448.0).item() == 2.0
    assert lp.pow2_scale(torch.tensor(0.0), 448.0).item() > 0


def test_fp8_linear_matches_bf16(linear):
    x = torch.randn(3, 50, 256, dtype=torch.bfloat16)
    fp8 = lp.Fp8Linear(linear, lp.SharedQuantizer(lp.fp8_quantize))
    y = fp8(x)
    assert y.shape == (3, 50, 384) and y.dtype == torch.bfloat16
    assert 0 < rel(y, linear(x)) < 0.06
    one_row = torch.randn(1, 256, dtype=torch.bfloat16)  # an adaLN modulation: rows padded to 16
    assert fp8(one_row).shape == (1, 384) and rel(fp8(one_row), linear(one_row)) < 0.06


def test_shared_quantizer_quantizes_a_tensor_once():
    calls = []
    quantizer = lp.SharedQuantizer(lambda flat: calls.append(flat.shape) or (flat,))
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert quantizer(x)[1] == 10 and quantizer(x)[1] == 10 and len(calls) == 1
    quantizer(y)
    x.add_(1)  # an in-place change is a new value
    quantizer(x)
    assert calls == [(16, 16)] * 3  # 10 rows padded to 16


def test_quantize_linears_replaces_every_linear_in_place():
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 32))).to(torch.bfloat16)
    assert lp.quantize_linears(block, "fp8") == 2
    assert isinstance(block[0], lp.Fp8Linear) and isinstance(block[2][0], lp.Fp8Linear)
    assert block[0].quantizer is block[2][0].quantizer
    assert block(torch.randn(4, 32, dtype=torch.bfloat16)).shape == (4, 32)


def test_nvfp4_round_trip(linear):
    weight = linear.weight.detach()
    packed, block_scale, tensor_scale = lp.nvfp4_quantize(weight)
    assert packed.shape == (384, 128) and packed.dtype == torch.uint8
    assert block_scale.shape == (384, 16) and block_scale.dtype == torch.float8_e4m3fn
    assert torch.log2(tensor_scale).item() == int(torch.log2(tensor_scale).item())
    assert rel(lp.nvfp4_dequantize(packed, block_scale, tensor_scale), weight) < 0.12  # 4-bit values


def test_e2m1_codes_are_the_nearest_values():
    values = torch.tensor([0.0, 0.3, -0.5, 0.9, 1.4, -1.6, 2.2, 2.9, 3.8, -4.4, 5.5, 6.0, -6.0, 0.1, -0.2, 4.9])
    codes = lp.e2m1_codes(values)
    assert codes.max().item() <= 15
    packed = codes[0::2] | (codes[1::2] << 4)
    decoded = lp.nvfp4_dequantize(packed, torch.ones(1).to(torch.float8_e4m3fn), torch.tensor(1.0))
    assert decoded.tolist() == [0.0, 0.5, -0.5, 1.0, 1.5, -1.5, 2.0, 3.0, 4.0, -4.0, 6.0, 6.0, -6.0, 0.0, 0.0, 4.0]


def test_to_blocked_is_cublas_swizzled_layout():
    """cuBLAS's 1D block scaling factors layout: 128x4 tiles, offset = tile * 512 + (row % 32) * 16 + (row % 128 //
    32) * 4 + col % 4, tiles row-major over (rows / 128, cols / 4), zero padded."""
    scales = (torch.rand(300, 12) * 100).to(torch.float8_e4m3fn)
    blocked = lp.to_blocked(scales).view(torch.uint8)
    assert blocked.numel() == 384 * 12
    col_tiles = 3
    for row in range(300):
        for col in range(12):
            offset = (512 * ((row // 128) * col_tiles + col // 4) + (row % 32) * 16 + (row % 128 // 32) * 4 + col % 4)
            assert blocked[offset].item() == scales[row, col].view(torch.uint8).item()
    assert blocked.sum().item() == scales.view(torch.uint8).sum().item()  # the padding is zeros


def test_nvfp4_gemm_emulated(linear):
    """What the NVFP4 _scaled_mm computes, emulated by decoding both operands: close to the bf16 linear."""
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    w = lp.nvfp4_dequantize(*lp.nvfp4_quantize(linear.weight.detach()))
    a = lp.nvfp4_dequantize(*lp.nvfp4_quantize(x))
    assert rel(a @ w.t() + linear.bias.float(), linear(x)) < 0.2
