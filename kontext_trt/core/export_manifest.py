"""DIR/manifest.json: what an export folder holds. The engines build and the onnxruntime backend read it.

Fields (plain JSON; every path is relative to DIR):

    format_version   int, FORMAT_VERSION; bumped on incompatible changes
    checkpoint       {"path": the checkpoint folder exported, "fingerprint": runtime.checkpoint.checkpoint_fingerprint}
    kontext          runtime.flow.KontextConfig.to_dict(): the model family (core.family: "flux1-kontext" or
                     "flux2-klein"; absent in older manifests: flux1-kontext), latent channels, VAE scale/shift,
                     guidance, shift line, T5 text length (absent in older manifests: 512)
    tokenizers       the family's {role: folder} (FLUX.1: {"clip": "tokenizer", "t5": "tokenizer_2"}, klein:
                     {"qwen": "tokenizer"}): folders copied from the checkpoint
    tools            versions of torch, onnx, onnxslim, diffusers, transformers and kontext-trt that exported
    stages           {stage name: entry}, only the stages exported so far, each entry:
        file           "transformer/model.onnx"
        external_data  true when the weights lie in model.onnx.data beside model.onnx (one file)
        weight_bytes   bytes of all initializers
        dtype          "fp32" | "bf16" | "fp16": the dtype the graph was traced in (weights and activations)
        precision      numeric format of the weights: "fp32" | "bf16" | "fp16" (quantization adds "fp8", "nvfp4")
        svd_rank       nvfp4 transformer only: rank of its SVDQuant low-rank branches (0: plain NVFP4)
        opset          ONNX opset of the default domain
        inputs         [{"name", "dtype" ("float32", "bfloat16", "int64", ...), "shape": [int | dim name],
                         "profile": {"min": [int], "opt": [int], "max": [int]}}]: concrete shapes for TensorRT
        outputs        [{"name", "dtype", "shape": [int | dim name | "8*dim" | "dim/8"]}]
        dims           {dim name: {"min", "opt", "max", "multiple_of"}} for every dynamic input dim (see specs.py)
        sha256         of model.onnx's content then each external data file's name and content (engines.onnx_dir
                       file_identity); build and the onnxruntime backend refuse a file that no longer matches
        weights        transformer only: {diffusers parameter name: {"name": ONNX initializer, "transpose": bool}}
                       (export/weight_map.py): how onnxruntime swaps and TensorRT refits its weights (LoRAs)
        loras          transformer only, when export --lora fused LoRAs in for good: [{"file", "scale"}]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from kontext_trt.core import files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, Family, family_named, known_stage_io
from kontext_trt.core.stages import DimRange, eval_dim

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZERS = FLUX1_KONTEXT.tokenizers  # manifests from before families
TOOLS = ("torch", "onnx", "onnxslim", "diffusers", "transformers", "kontext-trt")
FIX = "re-export with `kontext-trt export --force` (or delete manifest.json to scan the graphs)"


@dataclass
class ExportManifest:
    """DIR/manifest.json as a value: the fields above, `stages` holding one entry per stage exported so far."""

    checkpoint: dict[str, str]  # {"path", "fingerprint"}
    kontext: dict  # KontextConfig.to_dict()
    tokenizers: dict[str, str] = field(default_factory=lambda: dict(TOKENIZERS))
    tools: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def family(self) -> Family:
        """The model family exported (core.family), from the loop config it recorded."""
        return family_named(self.kontext.get("family", FLUX1_KONTEXT.name))

    @property
    def fingerprint(self) -> str:
        """The exported checkpoint's fingerprint."""
        return self.checkpoint["fingerprint"]

    def tokenizer_folder(self, folder: Path, which: str) -> Path:
        """Where the copied `clip` or `t5` tokenizer lies in the export folder."""
        return Path(folder) / self.tokenizers[which]

    def to_json(self) -> dict:
        """The JSON object written to manifest.json."""
        return {"format_version": self.format_version, "checkpoint": self.checkpoint, "kontext": self.kontext,
                "tokenizers": self.tokenizers, "tools": self.tools, "stages": self.stages}


def read_export_manifest(folder: Path) -> ExportManifest | None:
    """The one reader of an export folder's manifest.json: None if there is none; a one-line KontextError if it is
    unreadable, malformed or of another format version."""
    path = Path(folder) / MANIFEST
    data = files.read_json(path, fix=FIX)
    if data is None:
        return None
    stages, known = data.get("stages"), dict(known_stage_io())
    if not isinstance(stages, dict) or not all(
            name in known and isinstance(entry, dict) and isinstance(entry.get("file"), str)
            for name, entry in stages.items()):
        raise KontextError(f"{path} is malformed: 'stages' must map stage names ({', '.join(known)}) to entries "
                           f"with a 'file'; {FIX}", code="invalid_manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise KontextError(f"{path}: format_version {data.get('format_version')!r} is not {FORMAT_VERSION}; {FIX}",
                           code="invalid_manifest")
    try:
        return ExportManifest(data["checkpoint"], data["kontext"], data["tokenizers"], data.get("tools", {}), stages)
    except KeyError as missing:
        raise KontextError(f"{path} is malformed: it has no {missing} field; {FIX}", code="invalid_manifest") from None


def write_manifest(folder: Path, manifest: ExportManifest) -> Path:
    """Write DIR/manifest.json atomically (temp file, then rename)."""
    return files.write_json(Path(folder) / MANIFEST, manifest.to_json(), indent=2)


def record_stage(folder: Path, stage: str, entry: dict, fresh: ExportManifest) -> Path:
    """Add one stage's entry to DIR/manifest.json under the folder lock, keeping the stages siblings recorded meanwhile
    (`fresh` when there is no manifest yet)."""
    with files.folder_lock(folder):
        manifest = read_export_manifest(folder) or fresh
        manifest.stages[stage] = entry
        return write_manifest(folder, manifest)


def verify_files(folder: Path, manifest: ExportManifest) -> None:
    """Hash each stage's ONNX (external data included) once and refuse, in one line, one that no longer matches."""
    from kontext_trt.core.onnx_dir import file_identity
    from kontext_trt.core.timing import progress

    with progress(f"hashing the ONNX files of {folder} (sha256, checked once against its manifest)"):
        for entry in manifest.stages.values():
            path = Path(folder) / entry["file"]
            if "sha256" in entry and file_identity(path) != entry["sha256"]:
                raise KontextError(f"{path} (or its external data) is not what {Path(folder) / MANIFEST} records "
                                   "(sha256 differs): it changed or was damaged since the export; export it again")


def new_manifest(checkpoint_path: Path, fingerprint: str, kontext: dict) -> ExportManifest:
    """A manifest with no stages yet; its tokenizer folders are those of the family `kontext` names."""
    family = family_named(kontext.get("family", FLUX1_KONTEXT.name))
    return ExportManifest({"path": str(Path(checkpoint_path).resolve()), "fingerprint": fingerprint}, kontext,
                          dict(family.tokenizers), tools=tool_versions())


def stage_entry(stage: str, external: bool, weight_bytes: int, dtype: str, opset: int, inputs: list[dict],
                outputs: list[dict], dims: dict[str, DimRange]) -> dict:
    """One stages[...] entry; each input gets its min/opt/max profile from the dim ranges."""
    for value in inputs:
        value["profile"] = {key: [eval_dim(d, {name: getattr(r, key) for name, r in dims.items()})
                                  for d in value["shape"]] for key in ("min", "opt", "max")}
    return {"file": f"{stage}/model.onnx", "external_data": external, "weight_bytes": weight_bytes,
            "dtype": dtype, "precision": dtype, "opset": opset, "inputs": inputs, "outputs": outputs,
            "dims": {name: asdict(r) for name, r in dims.items()}}


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape an export."""
    return {name: metadata.version(name) for name in TOOLS}
