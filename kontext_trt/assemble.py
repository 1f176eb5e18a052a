"""Assemble a Kontext pipeline, in this one place for every backend: torch stages over a checkpoint, onnxruntime over an
export folder, TensorRT over an engine cache; tokenizers, loop config, CUDA graphs and `info` the same way for all.

The stage adapters (torch_stages, ort_stages, trt_stages) know only runtime.stages; what a request or a pipeline is
lives here and in runtime.flow.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from kontext_trt.core.checks import resolve_device
from kontext_trt.core.dtypes import DTYPES, TORCH_BACKEND_DTYPES
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import ExportManifest
from kontext_trt.core.family import FLUX1_KONTEXT, Family, family_named
from kontext_trt.core.specs import LoadSpec
from kontext_trt.core.stages import Stage
from kontext_trt.engines.cache import EngineManifest
from kontext_trt.engines.select import Geometry, GeometryOf, select_engines
from kontext_trt.runtime.cudagraphs import GRAPHED_STAGES, graphed
from kontext_trt.runtime.flow import EditRequest, Kontext, KontextConfig, PipelineInfo, ops_of

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnxruntime", "tensorrt")
Tokenizers = tuple[Any, Any]  # (CLIPTokenizer, T5TokenizerFast)


def request_geometry(req: EditRequest, family: Family = FLUX1_KONTEXT) -> Geometry:
    """What a request needs of a family's engines: the sizes flow.edit will use (the family's output size and each
    reference's size as its VAE encoder takes it) and the batch. The engine profiles count 16-pixel tokens
    (engines.profiles.tokens, the published VAEs'), so the family's default loop config sizes the references."""
    config, ops = KontextConfig(family=family.name), ops_of(family.name)
    sizes = ops.reference_sizes(config, req)
    return Geometry(*ops.output_size(config, req), len(req.prompts), sizes[0] if sizes else None, sizes[1:])


def build_pipeline(spec: LoadSpec, geometry: Geometry | GeometryOf | None = None) -> Kontext:
    """The one place a pipeline is built, for edit, generate, serve, bench and the Python API: the stages LoadSpec
    names (engines: the set that runs here and covers `geometry`, a Geometry or a function of the set's family such
    as partial(request_geometry, req)), tokenizers, loop config, CUDA graphs, LoRAs.
    Logs its load time (INFO: -v)."""
    start = time.perf_counter()
    k = _build_stages(spec, geometry)
    if spec.loras:
        k.set_loras(list(spec.loras))
    log.info("loaded the %s pipeline (%s) from %s in %.2fs", k.info.backend, k.info.precision, k.info.source,
             time.perf_counter() - start)
    return k


def _build_stages(spec: LoadSpec, geometry: Geometry | GeometryOf | None) -> Kontext:
    """build_pipeline without the LoRAs."""
    if spec.backend not in BACKENDS:
        raise KontextError(f"unknown backend {spec.backend!r}: use torch or onnxruntime (TensorRT: pass --engines DIR)",
                           param="backend")
    if spec.engines is not None or spec.backend == "tensorrt":
        if spec.backend == "onnxruntime":
            raise KontextError("--engines runs the TensorRT backend: drop --backend onnxruntime", param="backend")
        if spec.engines is None:
            raise KontextError("the TensorRT backend needs --engines DIR (made by `kontext-trt build`)",
                               param="engines", code="missing_argument")
        return load_engines(spec.engines, spec.precision, spec.sku, geometry, spec.onnx, spec.model, spec.low_vram,
                            spec.weight_budget, spec.cuda_graphs, spec.split)
    if spec.low_vram or spec.weight_budget is not None:
        raise KontextError("--low-vram and --weight-streaming-budget are TensorRT memory modes: add --engines DIR",
                           param="low_vram" if spec.low_vram else "weight_streaming_budget")
    if spec.precision is not None or spec.sku != "auto":
        raise KontextError("--precision and --sku pick an engine set: add --engines DIR (the torch and onnxruntime "
                           "backends take --dtype)", param="precision" if spec.precision is not None else "sku")
    dev = resolve_device(spec.device)
    if spec.cuda_graphs and dev.type != "cuda":
        raise KontextError("--cuda-graphs replays on a GPU: add --device cuda (or run engines with --engines DIR)",
                           param="cuda_graphs")
    if spec.backend == "onnxruntime":
        if spec.onnx is None:
            raise KontextError("--backend onnxruntime needs --onnx DIR (made by `kontext-trt export`)", param="onnx",
                               code="missing_argument")
        return load_onnx(spec.onnx, dev, spec.cuda_graphs)
    if spec.model is None:
        raise KontextError("no model given: pass --model CHECKPOINT_DIR (or run `kontext-trt synth DIR` for a test "
                           "one)", param="model", code="missing_argument")
    return load_torch(spec.model, spec.dtype, dev, spec.cuda_graphs)


def assemble(stages: dict[str, Stage], tokenizers: Tokenizers, config: KontextConfig, device: torch.device,
             info: PipelineInfo, cuda_graphs: bool = False) -> Kontext:
    """The pipeline over these stages; with cuda_graphs, its transformer step replays as a CUDA graph."""
    k = Kontext(stages, *tokenizers, config, device, info)
    return with_cuda_graphs(k) if cuda_graphs else k


def with_cuda_graphs(k: Kontext, names: tuple[str, ...] = GRAPHED_STAGES, max_graphs: int = 8) -> Kontext:
    """The pipeline sharing k's stages with those named replayed as CUDA graphs (runtime.cudagraphs)."""
    if k.device.type != "cuda":
        raise KontextError("--cuda-graphs replays on a GPU: add --device cuda (or run engines with --engines DIR)")
    wrapped = graphed(k.stages, names, max_graphs)
    return k.with_graphs({name: wrapped[name] for name in names if name in wrapped})


def load_torch(model: str | Path, dtype: str, device: torch.device, cuda_graphs: bool = False) -> Kontext:
    """The torch backend over a checkpoint folder (diffusers layout or BFL single files)."""
    from kontext_trt.core import checkpoint as ck
    from kontext_trt.runtime.torch_stages import torch_stages

    if dtype not in TORCH_BACKEND_DTYPES:
        raise KontextError(f"unknown dtype {dtype!r}: use {' or '.join(TORCH_BACKEND_DTYPES)}")
    ckpt = ck.open_checkpoint(model)
    info = PipelineInfo("torch", dtype, dtype, ck.checkpoint_fingerprint(ckpt)[:16], str(model))
    return assemble(torch_stages(ckpt, DTYPES[dtype], str(device)), ck.load_tokenizers(ckpt),
                    KontextConfig.from_checkpoint(ckpt), device, info, cuda_graphs)


def load_onnx(folder: str | Path, device: torch.device, cuda_graphs: bool = False) -> Kontext:
    """The onnxruntime backend over an export folder alone: its ONNX stages, tokenizers and manifest config."""
    from kontext_trt.core.export_manifest import read_export_manifest, verify_files
    from kontext_trt.runtime.ort_stages import ort_stages

    folder = Path(folder)
    manifest = read_export_manifest(folder)
    if manifest is None:
        raise KontextError(f"{folder}: no manifest.json, so not an export folder; "
                           f"run `kontext-trt export --model CHECKPOINT --out {folder}`")
    missing = [name for name in manifest.family.stage_names if name not in manifest.stages]
    if missing:  # before hashing: a user who forgot a stage hears that, not minutes of sha256 first
        raise KontextError(f"{folder}: stage {missing[0]} was not exported; run "
                           f"`kontext-trt export --model CHECKPOINT --out {folder} --stages {missing[0]}`")
    verify_files(folder, manifest)
    entries = manifest.stages
    dtype = ",".join(sorted({entry["dtype"] for entry in entries.values()}))
    precision = entries.get("transformer", {}).get("precision", dtype)
    info = PipelineInfo("onnxruntime", dtype, precision, manifest.fingerprint[:16], str(folder))
    return assemble(ort_stages(folder, manifest, str(device)), export_tokenizers(folder, manifest),
                    KontextConfig.from_dict(manifest.kontext), device, info, cuda_graphs)


def load_engines(engines: Path, precision: str | None = None, sku: str = "auto",
                 geometry: Geometry | GeometryOf | None = None, onnx: Path | None = None, model: Path | None = None,
                 low_vram: bool = False, weight_budget: int | str | None = None, cuda_graphs: bool = False,
                 split: bool = False) -> Kontext:
    """The TensorRT backend over the engine set of `engines` that runs here and covers `geometry` (see
    engines.select): the stages of the model family its manifest records, each with that family's I/O; tokenizers
    and config from the export it was built from (or `onnx`, or `model`).
    Resident mode loads every engine now, the transformer last (an auto weight-streaming budget then sees what the
    others took); low_vram loads each when its stage is first called. `split` (step caching) loads the transformer's
    three parts instead of the single transformer (one or the other, never both)."""
    from kontext_trt.engines.profiles import STREAMED_STAGES
    from kontext_trt.engines.trt_stages import EnginePool, TrtStage

    if split and low_vram:
        raise KontextError("--low-vram keeps one engine on the GPU and a cached step runs three transformer engines: "
                           "drop --low-vram or --cache (use --weight-streaming-budget to save memory)")
    chosen = select_engines(engines, precision, sku, geometry, split)
    found, family = chosen.found, chosen.family
    tokenizers, config = engine_tokenizers_and_config(found.manifest, onnx, model)
    if config.family != family.name:
        raise KontextError(f"the engines in {found.folder} run {family.label} and the tokenizers and loop config given "
                           f"are {family_named(config.family).label}'s: pass the export or checkpoint they were "
                           "built from (--onnx or --model)", "model", "model_mismatch")
    device = torch.device("cuda", chosen.gpu.cuda_index)  # the device whose SKU was detected
    pool = EnginePool(chosen.api, device, low_vram, weight_budget is not None, found.runtime_cache)
    rebuild = found.manifest.command
    stages = {name: TrtStage(name, found.plans[name], pool, weight_budget if name in STREAMED_STAGES else None,
                             cuda_graphs and name in GRAPHED_STAGES, rebuild, onnx, family.io(name))
              for name in chosen.stages if name in found.plans}
    if not low_vram:
        for name in sorted(stages, key=lambda name: name in STREAMED_STAGES):
            pool.admit(stages[name])
    checkpoint = (found.manifest.checkpoint_fingerprint or "")[:16] or None
    info = PipelineInfo(chosen.api.flavor, chosen.precision, chosen.precision, checkpoint, str(found.folder), pool.mode)
    return assemble(stages, tokenizers, config, device, info, cuda_graphs)


def export_tokenizers(folder: Path, manifest: ExportManifest) -> Tokenizers:
    """The tokenizers an export folder copied from its checkpoint (FLUX.1: CLIP's and T5's; klein: Qwen's and None)."""
    from kontext_trt.core.checkpoint import load_family_tokenizers

    return load_family_tokenizers(manifest.family.name, {role: manifest.tokenizer_folder(folder, role)
                                                         for role in manifest.tokenizers})


def engine_tokenizers_and_config(manifest: EngineManifest, onnx: Path | None,
                                 model: Path | None) -> tuple[Tokenizers, KontextConfig]:
    """(tokenizers, KontextConfig) of an engine set: from the export folder it was built from (or `onnx`), else from
    the checkpoint `model`."""
    from kontext_trt.core.export_manifest import read_export_manifest

    folder = onnx or manifest.onnx.get("dir")
    export = read_export_manifest(Path(folder)) if folder and Path(folder).is_dir() else None
    if export is not None:
        config = KontextConfig.from_dict(manifest.onnx.get("kontext") or export.kontext)
        return export_tokenizers(Path(folder), export), config
    if model is None:
        raise KontextError(f"the export folder the engines were built from ({folder}) holds no manifest.json, and "
                           "the tokenizers and loop config come from it: pass --onnx EXPORT_DIR or --model CHECKPOINT")
    from kontext_trt.core import checkpoint as ck
    ckpt = ck.open_checkpoint(model)
    return ck.load_tokenizers(ckpt), KontextConfig.from_checkpoint(ckpt)
