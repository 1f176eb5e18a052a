"""Read an ONNX folder: export/'s (manifest.json) or BFL's published Kontext ONNX (no manifest: stages, shapes and
precision come from the graphs)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from kontext_trt.runtime import files
from kontext_trt.runtime.errors import KontextError
from kontext_trt.runtime.stages import STAGE_IO, STAGE_NAMES

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "nvfp4")  # widest to narrowest
_FP4_OPS = {"TRT_FP4DynamicQuantize", "TRT_FP4QDQ"}
_FP8_OPS = {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "TRT_MXFP8DequantizeLinear"}
_ELEM = onnx.TensorProto


@dataclass(frozen=True)
class OnnxStage:
    """One stage's ONNX file: where, which precision, its inputs' shapes and dtypes, and a content hash."""

    stage: str
    path: Path
    precision: str
    shapes: dict[str, tuple[int | str, ...]]
    dtypes: dict[str, str]
    sha256: str


@dataclass
class OnnxDir:
    """All stage files in a folder (a stage may come in several precisions) and the export manifest, if any."""

    root: Path
    stages: dict[str, dict[str, OnnxStage]] = field(default_factory=dict)
    manifest: dict | None = None
    manifest_sha256: str | None = None

    @property
    def fingerprint(self) -> str | None:
        """The checkpoint fingerprint export/ recorded, or None for a folder without a manifest."""
        return ((self.manifest or {}).get("checkpoint") or {}).get("fingerprint")

    def pick(self, stage: str, precision: str | None) -> OnnxStage:
        """The file for a stage: the requested precision (required for the transformer), else the widest there is."""
        variants = self.stages.get(stage)
        if not variants:
            raise KontextError(f"no {stage} ONNX in {self.root}: export it (kontext-trt export) or leave it out of "
                               "--stages")
        if precision in variants:
            return variants[precision]
        if stage == "transformer" and precision is not None:
            raise KontextError(f"no {precision} transformer ONNX in {self.root} (found {', '.join(variants)}): export "
                               f"or quantize it to {precision}, or build with --precision {next(iter(variants))}")
        return min(variants.values(), key=lambda s: PRECISIONS.index(s.precision))


def stage_of(inputs: list[str], outputs: list[str]) -> str | None:
    """The stage whose contract has these inputs (guidance optional) and whose outputs they include (the first
    stage wins: clip, whose outputs include t5's, is tried before t5)."""
    for name, (ins, outs) in STAGE_IO.items():
        if set(ins) - {"guidance"} <= set(inputs) <= set(ins) and set(outs) <= set(outputs):
            return name
    return None


def graph_precision(model: onnx.ModelProto) -> str:
    """The narrowest precision in a graph: nvfp4 or fp8 Q/DQ nodes or tensors, else the float type of its weights."""
    graph = model.graph
    ops = {node.op_type for node in graph.node}
    types = {t.data_type for t in graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    for node in graph.node:
        types |= {a.i for a in node.attribute if a.name in ("to", "output_dtype")}
    if ops & _FP4_OPS or _ELEM.FLOAT4E2M1 in types:
        return "nvfp4"
    if ops & _FP8_OPS or _ELEM.FLOAT8E4M3FN in types:
        return "fp8"
    floats = {t.data_type for t in graph.initializer} & {_ELEM.FLOAT, _ELEM.FLOAT16, _ELEM.BFLOAT16}
    return "bf16" if _ELEM.BFLOAT16 in floats else "fp16" if _ELEM.FLOAT16 in floats else "fp32"


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    """A value's shape: ints for fixed sizes, dim names (or '?') for symbolic ones."""
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value.type.tensor_type.shape.dim)


def read_stage(path: Path, stage: str | None = None, precision: str | None = None) -> OnnxStage | None:
    """Describe one ONNX file (graph only, external weights not loaded); None if it is not a Kontext stage."""
    if not path.is_file():
        raise KontextError(f"ONNX file {path} is missing: export again or fix the folder")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: a corrupted or truncated file
        raise KontextError(f"{path} is not a readable ONNX model ({type(error).__name__}): it is corrupted or "
                           "truncated; export it again") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    found = stage_of([v.name for v in inputs], [v.name for v in model.graph.output])
    if found is None or (stage is not None and found != stage):
        return None
    return OnnxStage(
        stage=found, path=path, precision=precision or graph_precision(model),
        shapes={v.name: _dims(v) for v in inputs},
        dtypes={v.name: _ELEM.DataType.Name(v.type.tensor_type.elem_type).lower() for v in inputs},
        sha256=file_identity(path, model))


def file_identity(path: Path, model: onnx.ModelProto) -> str:
    """sha256 of the .onnx file plus the names and sizes of the external data files it points to."""
    digest = hashlib.sha256(path.read_bytes())
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    for location in locations:
        data = path.parent / location
        digest.update(f"{location}:{data.stat().st_size if data.exists() else -1}".encode())
    return digest.hexdigest()


def read_onnx_dir(root: Path) -> OnnxDir:
    """Every stage in an ONNX folder: from manifest.json when export/ wrote one, else by scanning *.onnx graphs."""
    root = Path(root)
    if not root.is_dir():
        raise KontextError(f"ONNX folder {root} does not exist: pass the folder kontext-trt export wrote (or BFL's "
                           "ONNX)")
    found = OnnxDir(root)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        fix = "export the folder again (kontext-trt export) or delete manifest.json to scan the graphs"
        found.manifest = files.read_json(manifest_path, fix=fix)
        found.manifest_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        stages = found.manifest.get("stages")
        if not isinstance(stages, dict) or not all(
                name in STAGE_NAMES and isinstance(entry, dict) and isinstance(entry.get("file"), str)
                for name, entry in stages.items()):
            raise KontextError(f"{manifest_path} is malformed: 'stages' must map stage names ({', '.join(STAGE_NAMES)})"
                               f" to entries with a 'file'; {fix}")
        for name, entry in stages.items():
            stage = read_stage(root / entry["file"], name, entry.get("precision"))
            if stage is None:
                raise KontextError(f"{root / entry['file']} does not have the {name} inputs/outputs of the stage "
                                   "contract")
            found.stages.setdefault(name, {})[stage.precision] = stage
    else:
        for path in sorted(root.rglob("*.onnx")):
            stage = read_stage(path)
            if stage is not None:
                found.stages.setdefault(stage.stage, {}).setdefault(stage.precision, stage)
    if not found.stages:
        raise KontextError(f"no Kontext stage ONNX ({', '.join(STAGE_NAMES)}) found in {root}")
    return found
