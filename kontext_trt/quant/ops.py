"""The four Q/DQ ops of a quantized transformer: torch custom ops (eager: formats.py) and their ONNX translations.

Eager, they run the emulation on any device; torch.export keeps them opaque and the ONNX exporter writes them as:

- fp8_qdq(x, scale): QuantizeLinear(x, scale, zero point FLOAT8E4M3FN) -> DequantizeLinear; scale 0-d in x's dtype.
- fp8_dq(w, scale): DequantizeLinear(w, scale), w a FLOAT8E4M3FN (K, N) initializer fed straight to MatMul.
- nvfp4_qdq(x, scale): trt::TRT_FP4DynamicQuantize(x, scale) -> FLOAT4E2M1 values and FLOAT8E4M3FN block scales,
  then DequantizeLinear(block scales, scale) -> DequantizeLinear(values, axis -1, block 16); scale = amax / (6*448).
- nvfp4_dq(w, block_scale, scale): the same two DequantizeLinear on a FLOAT4E2M1 (N, K) initializer (stored packed
  as torch.float4_e2m1fn_x2 (N, K/2), low nibble first) and its FLOAT8E4M3FN (N, K/16) block scales.

Standard ONNX has no dynamic block quantization, so NVFP4 activations use TensorRT's TRT_FP4DynamicQuantize, which
TensorRT(-RTX) parses into IDynamicQuantizeLayer (ModelOpt's NVFP4 ONNX export uses the same op and DQ pattern).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset23 as op

from kontext_trt.quant import formats

TRT = onnxscript.values.Opset("trt", 1)


@torch.library.custom_op("kontext_quant::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 quantize-dequantize of an activation."""
    return formats.fp8_qdq(x, scale)


@torch.library.custom_op("kontext_quant::fp8_dq", mutates_args=())
def fp8_dq(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight (float8_e4m3fn) times its scale, in the scale's dtype."""
    return (w.float() * scale.float()).to(scale.dtype)


@torch.library.custom_op("kontext_quant::nvfp4_qdq", mutates_args=())
def nvfp4_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of an activation along its last axis (block scales computed on the fly)."""
    return formats.nvfp4_qdq(x, scale)


@torch.library.custom_op("kontext_quant::nvfp4_dq", mutates_args=())
def nvfp4_dq(w: torch.Tensor, block_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed NVFP4 weight (N, K/2) -> (N, K) in the scale's dtype."""
    codes = formats.unpack_e2m1(w.view(torch.uint8))
    return formats.nvfp4_dequantize(codes, block_scale, scale, scale.dtype)


@fp8_qdq.register_fake
@nvfp4_qdq.register_fake
def _like_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@fp8_dq.register_fake
def _fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(w.shape, dtype=scale.dtype, device=w.device)


@nvfp4_dq.register_fake
def _fp4_weight(w: torch.Tensor, block_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty((w.shape[0], 2 * w.shape[1]), dtype=scale.dtype, device=w.device)


def _fp8_qdq_onnx(x, scale):
    zero = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def _fp8_dq_onnx(w, scale):
    return op.DequantizeLinear(w, scale)


def _nvfp4_qdq_onnx(x, scale):
    x4, block_scale = TRT.TRT_FP4DynamicQuantize(x, scale, axis=-1, block_size=formats.BLOCK,
                                                 scale_type=onnx.TensorProto.FLOAT8E4M3FN, _outputs=2)
    return op.DequantizeLinear(x4, op.DequantizeLinear(block_scale, scale), axis=-1, block_size=formats.BLOCK)


def _nvfp4_dq_onnx(w, block_scale, scale):
    return op.DequantizeLinear(w, op.DequantizeLinear(block_scale, scale), axis=-1, block_size=formats.BLOCK)


def register_trt_schema() -> None:
    """Declare trt::TRT_FP4DynamicQuantize to onnx (once per process) so the exporter and checker can type it."""
    if onnx.defs.has("TRT_FP4DynamicQuantize", "trt"):
        return
    onnx.defs.register_schema(OpSchema(
        "TRT_FP4DynamicQuantize", "trt", 1, doc="TensorRT dynamic NVFP4 block quantization (IDynamicQuantizeLayer)",
        inputs=[OpSchema.FormalParameter("x", "T1"), OpSchema.FormalParameter("scale", "T1")],
        outputs=[OpSchema.FormalParameter("y", "T2"), OpSchema.FormalParameter("block_scale", "T3")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "input and scale"),
                          ("T2", ["tensor(float4e2m1)"], "quantized values"),
                          ("T3", ["tensor(float8e4m3fn)"], "block scales")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, name) for name in ("axis", "block_size",
                                                                                        "scale_type")]))


TRANSLATIONS = {
    torch.ops.kontext_quant.fp8_qdq.default: _fp8_qdq_onnx,
    torch.ops.kontext_quant.fp8_dq.default: _fp8_dq_onnx,
    torch.ops.kontext_quant.nvfp4_qdq.default: _nvfp4_qdq_onnx,
    torch.ops.kontext_quant.nvfp4_dq.default: _nvfp4_dq_onnx,
}
