"""Read an ONNX folder: export/'s (manifest.json), BFL's published Kontext ONNX (black-forest-labs/FLUX.1-Kontext-dev-onnx
or demoDiffusion's copy: no manifest, a folder per stage, one transformer subfolder per precision), or any folder of
stage graphs. Without a manifest, stages, shapes, dtypes and precision come from the graphs' own I/O (describe())."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from kontext_trt.core import files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import MANIFEST, ExportManifest, read_export_manifest
from kontext_trt.core.family import known_stage_io
from kontext_trt.core.stages import STAGE_IO, STAGE_NAMES
from kontext_trt.core.timing import progress

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "nvfp4")  # widest to narrowest
_FP4_OPS = {"TRT_FP4DynamicQuantize", "TRT_FP4QDQ"}
_FP8_OPS = {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "TRT_MXFP8DequantizeLinear"}
_ELEM = onnx.TensorProto
# BFL's layout: folder -> stage (vae.opt is the decoder), and transformer.opt/<subfolder> -> precision
BFL_FOLDERS = {"clip.opt": "clip", "t5.opt": "t5", "transformer.opt": "transformer", "vae.opt": "vae_decoder",
               "vae_encoder.opt": "vae_encoder"}
BFL_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "fp4": "nvfp4", "fp4_svd32": "nvfp4"}


@dataclass(frozen=True)
class OnnxStage:
    """One stage's ONNX file: where, which precision, its inputs' shapes and dtypes, and a content hash."""

    stage: str
    path: Path
    precision: str
    shapes: dict[str, tuple[int | str, ...]]
    dtypes: dict[str, str]
    sha256: str
    outputs: dict[str, tuple[str, tuple[int | str, ...]]] = field(default_factory=dict)  # name: (dtype, shape)


@dataclass
class OnnxDir:
    """All stage files in a folder (a stage may come in several precisions) and the export manifest, if any."""

    root: Path
    stages: dict[str, dict[str, OnnxStage]] = field(default_factory=dict)
    manifest: ExportManifest | None = None
    manifest_sha256: str | None = None
    layout: str = "export"  # "export" (manifest.json), "bfl" (BFL's published ONNX) or "graphs" (any other folder)

    @property
    def fingerprint(self) -> str | None:
        """The checkpoint fingerprint export/ recorded, or None for a folder without a manifest."""
        return None if self.manifest is None else self.manifest.fingerprint

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

    def describe(self) -> dict:
        """Our manifest for a folder without one, written from the graphs' own I/O: its layout and, per stage and
        precision, the file and its inputs and outputs (name, dtype, shape), as export/'s manifest lists them."""
        return {"layout": self.layout, "stages": {
            stage: {precision: {
                "file": str(s.path.relative_to(self.root)), "precision": precision,
                "inputs": [{"name": n, "dtype": s.dtypes[n], "shape": list(s.shapes[n])} for n in s.shapes],
                "outputs": [{"name": n, "dtype": d, "shape": list(shape)} for n, (d, shape) in s.outputs.items()]}
                for precision, s in variants.items()}
            for stage, variants in self.stages.items()}}


def stage_of(inputs: list[str], outputs: list[str]) -> str | None:
    """The stage whose contract (any family's, FLUX.1's first) has these inputs (guidance optional) and whose outputs
    they include (the first stage wins: clip, whose outputs include t5's, is tried before t5)."""
    for name, (ins, outs) in known_stage_io():
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
        dtypes={v.name: _dtype(v) for v in inputs},
        sha256=file_identity(path, model),
        outputs={v.name: (_dtype(v), _dims(v)) for v in model.graph.output})


def _dtype(value: onnx.ValueInfoProto) -> str:
    """A value's element type as onnx names it, lower case: float, bfloat16, int32, ..."""
    return _ELEM.DataType.Name(value.type.tensor_type.elem_type).lower()


def file_identity(path: Path, model: onnx.ModelProto | None = None) -> str:
    """sha256 of the .onnx file's content followed by the name and content of each external data file it points to."""
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf's DecodeError and friends: a corrupted or truncated file
            raise KontextError(f"{path} is not a readable ONNX model ({type(error).__name__}): it is corrupted or "
                               "truncated; export it again") from None
    digest = hashlib.sha256(Path(path).read_bytes())
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    for location in locations:
        data = Path(path).parent / location
        digest.update(f"\0{location}\0".encode())
        if not data.is_file():
            raise KontextError(f"{path} keeps its weights in {data}, which is missing: export it again")
        files.sha256_file(data, digest)
    return digest.hexdigest()


def read_onnx_dir(root: Path) -> OnnxDir:
    """Every stage in an ONNX folder: from manifest.json when export/ wrote one, else by scanning *.onnx graphs."""
    root = Path(root)
    if not root.is_dir():
        raise KontextError(f"ONNX folder {root} does not exist: pass the folder kontext-trt export wrote (or BFL's "
                           "ONNX)")
    found = OnnxDir(root)
    manifest_path = root / MANIFEST
    found.manifest = read_export_manifest(root)
    if found.manifest is not None:
        found.manifest_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        stages = found.manifest.stages
        with progress(f"hashing the ONNX files of {root} (sha256, checked against its manifest)"):
            for name, entry in stages.items():
                stage = read_stage(root / entry["file"], name, entry.get("precision"))
                if stage is None:
                    raise KontextError(f"{root / entry['file']} does not have the {name} inputs/outputs of the stage "
                                       "contract")
                if entry.get("sha256", stage.sha256) != stage.sha256:
                    raise KontextError(f"{stage.path} (or its external data) is not what {manifest_path} records "
                                       f"(sha256 differs): it changed or was damaged since the export; export it again")
                found.stages.setdefault(name, {})[stage.precision] = stage
    elif any((root / folder).is_dir() for folder in BFL_FOLDERS):
        found.layout = "bfl"
        read_bfl(found)
    else:
        found.layout = "graphs"
        for path in sorted(root.rglob("*.onnx")):
            stage = read_stage(path)
            if stage is not None:
                found.stages.setdefault(stage.stage, {}).setdefault(stage.precision, stage)
    if not found.stages:
        raise KontextError(f"no Kontext stage ONNX ({', '.join(STAGE_NAMES)}) found in {root}")
    return found


def read_bfl(found: OnnxDir) -> None:
    """The stages of BFL's layout: the stage from its folder, the transformer's precision from its subfolder (fp4_svd32
    is nvfp4), others' from the graph; each graph's I/O must be its stage's."""
    for folder, stage in BFL_FOLDERS.items():
        for path in sorted((found.root / folder).rglob("*.onnx")):
            sub = path.parent.relative_to(found.root / folder).parts
            precision = BFL_PRECISIONS.get(sub[0]) if stage == "transformer" and sub else None
            described = read_stage(path, stage, precision)
            if described is None:
                raise KontextError(f"{path} is in BFL's {folder} folder but its inputs/outputs are not the {stage} "
                                   f"stage's ({', '.join(STAGE_IO[stage][0])} -> {', '.join(STAGE_IO[stage][1])})")
            found.stages.setdefault(stage, {}).setdefault(described.precision, described)
