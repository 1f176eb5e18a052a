"""Change the float type of an ONNX graph: every initializer, graph value, constant and cast of one float type made
another. bf16 -> fp32 gives `kontext-trt check` a reference ONNX Runtime can run (its CPU kernels have no bf16
MatMul, Conv or Resize); fp32 -> bf16 turns a test export into a bf16 one."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx
from onnx import TensorProto, helper, numpy_helper

TYPE_ATTRIBUTES = ("to", "dtype")  # node attributes that name an element type (Cast, ConstantOfShape-like ops)
EXTERNAL_ABOVE = 1 << 30  # write weights beside the graph above this many bytes (protobuf's 2 GiB limit)


def cast_tensor(tensor: onnx.TensorProto, src: int, dst: int) -> None:
    """Convert one tensor (its data loaded) from src to dst in place."""
    if tensor.data_type == src:
        values = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(dst))
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def cast_graph(graph: onnx.GraphProto, src: int, dst: int) -> None:
    """Convert every src-typed thing in a graph (and its subgraphs) to dst, in place."""
    for tensor in graph.initializer:
        cast_tensor(tensor, src, dst)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == src:
            value.type.tensor_type.elem_type = dst
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT and attribute.i == src:
                attribute.i = dst
            elif attribute.type == onnx.AttributeProto.TENSOR:
                cast_tensor(attribute.t, src, dst)
            elif attribute.type == onnx.AttributeProto.GRAPH:
                cast_graph(attribute.g, src, dst)


def has_type(model: onnx.ModelProto, dtype: int) -> bool:
    """Whether any initializer or graph input/output of the main graph has this element type."""
    graph = model.graph
    return any(t.data_type == dtype for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == dtype for v in (*graph.input, *graph.output))


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write a model, its weights in one file beside it when large."""
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > EXTERNAL_ABOVE, location=f"{path.name}.data")
    return path


@contextmanager
def fp32_copy(path: Path) -> Iterator[Path]:
    """The ONNX file itself when it has no bf16 tensors, else a temporary fp32 copy of it (the same graph in fp32:
    a reference for a bf16 engine; needs the disk and memory of the fp32 weights)."""
    model = onnx.load(str(path), load_external_data=False)
    if not has_type(model, TensorProto.BFLOAT16):
        yield Path(path)
        return
    model = onnx.load(str(path))
    cast_graph(model.graph, TensorProto.BFLOAT16, TensorProto.FLOAT)
    with tempfile.TemporaryDirectory(prefix="kontext-check-") as folder:
        yield save(model, Path(folder) / Path(path).name)
