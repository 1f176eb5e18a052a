"""One stage's ONNX file: trace with torch.export, clean with onnxslim, check, and describe it for the manifest.

The raw export writes its weights to raw.onnx.data; onnxslim then cleans the graph with only the small weights
loaded (it inspects biases and norms, never the matrices), so no second copy of a stage's weights is ever held:
a stage at or under the external-data threshold is written as one model.onnx a weight at a time (write_inline),
a heavier one has its weights streamed by onnx_ir from the raw file into one model.onnx.data.
"""
from __future__ import annotations

import gc
import logging
import math
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxslim
import torch
from onnx import TensorProto, helper
from onnx.external_data_helper import load_external_data_for_tensor

from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, Family
from kontext_trt.export.specs import SPECS, dynamic_shapes, sample_inputs

MODEL, DATA = "model.onnx", "model.onnx.data"
RAW, SLIM = "raw.onnx", "slim.onnx"  # the exporter's graph (weights in raw.onnx.data) and the cleaned one
SMALL = 4 * 1024 ** 2  # weights up to this size are loaded for onnxslim to inspect (biases, norms, embeddings)
DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
               TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}


def trace(module: torch.nn.Module, stage: str, transformer_config: dict, dtype: torch.dtype, opset: int,
          folder: Path, text_length: int, family: Family = FLUX1_KONTEXT) -> None:
    """torch.export `module` with the family's I/O names and the stage's dynamic dims (FLUX.1's T5 text static at
    text_length tokens) and write folder/raw.onnx + raw.onnx.data."""
    inputs, outputs = family.io(stage)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "no torchvision"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch internals' deprecation chatter
        warnings.filterwarnings("ignore", message="# The axis name")  # our Dims are shared across inputs on purpose
        program = torch.onnx.export(
            module.eval(), (), kwargs=sample_inputs(stage, transformer_config, dtype, text_length, family),
            dynamo=True, opset_version=opset, input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=dynamic_shapes(stage, family), optimize=True, verbose=False)
    program.save(folder / RAW, external_data=True)
    del program
    forget_last_graph()


def forget_last_graph() -> None:
    """Clear the state onnxscript's module-level rewrite rules keep after optimizing (onnxscript 0.7).

    Each rule's SimplePatternMatcher holds the last graph it matched, and through it every weight of the stage just
    exported: without this, a stage's weights stay alive into the next stage's export.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), SimplePatternMatcher):  # type(): no attribute access on arbitrary objects
            obj._graph = obj._tracer = obj._current_node = obj._match = None
    gc.collect()


def clean(folder: Path, stage: str, external_threshold: int,
          family: Family = FLUX1_KONTEXT) -> tuple[onnx.ModelProto, bool]:
    """Name the I/O dims as the family's specs.SPECS shapes, slim the graph (folding, shape inference), refuse float64
    anywhere.

    Returns the cleaned model and whether its weights stay external (over external_threshold bytes).
    """
    model = onnx.load(folder / RAW, load_external_data=False)
    external = weight_bytes(model) > external_threshold
    name_dims(model, stage, family)
    before = weight_dtypes(model)
    del model.graph.value_info[:]  # re-inferred by onnxslim, with our dim names
    for tensor in weights(model):
        if tensor.data_location == TensorProto.EXTERNAL and tensor_bytes(tensor) <= SMALL:
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    model = onnxslim.slim(model)
    changed = [name for name, dtype in weight_dtypes(model).items() if before.get(name, dtype) != dtype]
    if changed:
        raise KontextError(f"{stage}: onnxslim changed the dtype of {', '.join(changed[:3])}; "
                           f"this is an export bug, please report it")
    wide = float64_tensors(model.graph)
    if wide:
        raise KontextError(f"{stage}: the graph has float64 tensors ({', '.join(wide[:3])}), which TensorRT cannot "
                           f"build; this is an export bug, please report it")
    return model, external


def save(model: onnx.ModelProto, folder: Path, external: bool) -> None:
    """Check the cleaned graph, write folder/model.onnx (weights inline, or streamed into model.onnx.data), drop the rest."""
    onnx.save(model, folder / SLIM)  # its big weights still point into raw.onnx.data
    onnx.checker.check_model(str(folder / SLIM), full_check=True)  # from the path: big weights are not read
    if external:
        ir.save(ir.load(folder / SLIM), folder / MODEL, external_data=DATA)
    else:
        write_inline(model, folder)
    for name in (RAW, f"{RAW}.data", SLIM):
        (folder / name).unlink(missing_ok=True)


def write_inline(model: onnx.ModelProto, folder: Path) -> None:
    """Write folder/model.onnx with every weight inline, holding one big weight in memory at a time.

    Protobuf parses concatenated messages as one merged message (repeated fields append), so the graph goes first
    without its external initializers, then each of them as a ModelProto holding just that initializer.
    """
    def loaded(tensor: TensorProto) -> TensorProto:
        load_external_data_for_tensor(tensor, str(folder))
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
        return tensor

    head = onnx.ModelProto()
    head.CopyFrom(model)  # big weights are references here, so this copy is small
    del head.graph.initializer[:]
    head.graph.initializer.extend(t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL)
    for tensor in weights(head):
        if tensor.data_location == TensorProto.EXTERNAL:  # a Constant node's
            loaded(tensor)
    with open(folder / MODEL, "wb") as f:
        f.write(head.SerializeToString())
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                one = onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor]))
                loaded(one.graph.initializer[0])
                f.write(one.SerializeToString())


def name_dims(model: onnx.ModelProto, stage: str, family: Family = FLUX1_KONTEXT) -> None:
    """Give every dynamic I/O dim its name in the family's specs.SPECS shapes; refuse a dim that tracing made static."""
    shapes = SPECS[family.name].shapes[stage]
    for value in [*model.graph.input, *model.graph.output]:
        for dim, want in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            if isinstance(want, str):
                if dim.HasField("dim_value"):
                    raise KontextError(f"{stage}: {value.name} was traced with a static {dim.dim_value} where "
                                       f"{want} should be dynamic; this is an export bug, please report it")
                dim.dim_param = want


def weights(model: onnx.ModelProto) -> list[TensorProto]:
    """Initializers and Constant-node tensors (onnxslim may turn the one into the other)."""
    constants = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return [*model.graph.initializer, *constants]


def weight_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Each weight's dtype, by name."""
    return {tensor.name: tensor.data_type for tensor in weights(model)}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weights, from their dims and dtype (data need not be loaded)."""
    return sum(tensor_bytes(t) for t in weights(model))


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of one tensor's data as stored, from its dims and dtype (FLOAT4E2M1 packs two values a byte)."""
    if tensor.data_type == TensorProto.FLOAT4E2M1:
        return math.ceil(math.prod(tensor.dims) / 2)
    return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def float64_tensors(graph: onnx.GraphProto) -> list[str]:
    """Names of float64 tensors, casts and constants in a graph and its subgraphs."""
    found = [t.name for t in graph.initializer if t.data_type == TensorProto.DOUBLE]
    found += [v.name for v in [*graph.input, *graph.output, *graph.value_info]
              if v.type.tensor_type.elem_type == TensorProto.DOUBLE]
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.DOUBLE:
                found.append(node.name or node.op_type)
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                found.append(node.name or node.op_type)
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                for sub in [attr.g, *attr.graphs]:
                    found += float64_tensors(sub)
    return found


def describe(values) -> list[dict]:
    """Name, dtype and shape (ints and dim names) of graph inputs or outputs."""
    return [{"name": v.name, "dtype": DTYPE_NAMES[v.type.tensor_type.elem_type],
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
