"""Which engine set of an engine cache runs here: this GPU's SKU, the installed TensorRT flavour, the precision, and
the profile that covers a request's geometry (or one line saying why none does and the build command that makes it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import Family
from kontext_trt.engines import cache, profiles, trt_api
from kontext_trt.engines import device as gpus
from kontext_trt.engines.skus import PRECISION_FALLBACK, Sku, precision_refusal


@dataclass(frozen=True)
class Geometry:
    """What a request needs of the engines: output size, batch, the context image size (None: text-to-image) and
    the further references' sizes (FLUX.2 [klein]), each as its VAE encoder sees it."""

    width: int
    height: int
    batch: int = 1
    context: tuple[int, int] | None = None
    references: tuple[tuple[int, int], ...] = ()


GeometryOf = Callable[[Family], Geometry]  # a request's geometry for the family of the engine set found


@dataclass(frozen=True)
class EngineSet:
    """The engine set chosen: the GPU it runs on, the TensorRT flavour that runs it, its precision, what
    cache.find_engines found, its model family and the stages it runs."""

    gpu: gpus.Gpu
    api: trt_api.TrtApi
    precision: str
    found: cache.Engines
    family: Family
    stages: tuple[str, ...]


def cuda_gpu() -> gpus.Gpu:
    """The GPU the engines must run on, or one line saying there is none."""
    gpu, why = gpus.detect_gpu()  # torch's current CUDA device, found in NVML by its UUID
    if gpu is not None and gpu.cuda_index is None:
        gpu, why = None, f"torch {torch.__version__} sees no CUDA device (a CPU-only torch build?)"
    if gpu is None:
        raise KontextError(f"--engines runs TensorRT engines on an NVIDIA GPU and none is usable here ({why}): run on "
                           "the GPU the engines were built for, or use --backend onnxruntime --onnx DIR",
                           "engines", "gpu_unavailable")
    return gpu


def tensorrt_for_this_gpu() -> tuple[trt_api.TrtApi, gpus.Gpu]:
    """(the TensorRT flavour that builds and runs engines on this host's GPU, the GPU), or one line saying what is
    missing: a GPU torch can use, its SKU, that SKU's flavour installed and new enough (tensorrt for datacenter GPUs,
    tensorrt-rtx for RTX ones), and that flavour able to target the GPU's compute capability."""
    gpu = cuda_gpu()
    api = trt_api.load_api(gpus.resolve_sku("auto", gpu).flavor)
    trt_api.check_targets(api, (gpu.sm,), gpu.sm)
    return api, gpu


def gpu_sku(name: str, gpu: gpus.Gpu) -> Sku:
    """The SKU whose engines run on this GPU: NVML's ('auto'), or one named, which must be this GPU's architecture
    (an engine runs only on the compute capability it was built for)."""
    sku = gpus.resolve_sku(name, gpu)
    if sku.sm != gpu.sm:
        raise KontextError(f"--sku {name} engines are for sm{sku.sm} and this GPU ({gpu.name}) is sm{gpu.sm}: use "
                           f"--sku auto, or build engines for it with kontext-trt build --sku auto",
                           "sku", "gpu_mismatch")
    return sku


def pick_api(root: Path, sku: Sku) -> trt_api.TrtApi:
    """The installed TensorRT flavour that root has engines of for this SKU (the SKU's own flavour first)."""
    installed = []
    for flavor in dict.fromkeys([sku.flavor, *trt_api.MODULES]):
        try:
            installed.append(trt_api.load_api(flavor))
        except KontextError:
            continue
    if not installed:
        trt_api.load_api(sku.flavor)  # raises the one-line install hint
    return next((api for api in installed if (Path(root) / sku.tag / api.folder).is_dir()), installed[0])


def default_geometry(manifest: cache.EngineManifest | None) -> Geometry:
    """The geometry an engine set (its manifest) covers if it covers anything: its opt size, batch at its low end, an
    edit when it has a VAE encoder."""
    build = manifest.build if manifest else {}
    width, height = profiles.opt_size(profiles.parse_sizes(build.get("static") or build.get("sizes") or "1024x1024"))
    edit = manifest is None or "vae_encoder" in manifest.stages
    return Geometry(width, height, profiles.parse_batch(build.get("batch", "1"))[0], (width, height) if edit else None)


def select_engines(engines: Path, precision: str | None = None, sku: str = "auto",
                   geometry: Geometry | GeometryOf | None = None, split: bool = False) -> EngineSet:
    """The engine set in `engines` for this GPU (or the SKU named), the installed TensorRT and `precision` (default:
    the only one built) that covers `geometry` (a Geometry, or a function of the set's model family; default: the
    set's own opt size); its stages are its family's (`split`: with the transformer's parts, for step caching)."""
    gpu = cuda_gpu()
    chosen = gpu_sku(sku, gpu)
    api = pick_api(engines, chosen)
    precision = cache.pick_precision(Path(engines) / chosen.tag / api.folder, precision)
    refusal = precision_refusal(precision, gpu.sm)
    if refusal is not None:
        fallback = PRECISION_FALLBACK.get(precision, "fp32")
        raise KontextError(f"{gpu.name} cannot run {precision} engines: {refusal}: run {fallback} engines instead "
                           f"(--precision {fallback.split()[0]})", "precision", "gpu_mismatch")
    folder = cache.engine_folder(engines, chosen, api.folder, precision)
    manifest = cache.read_engine_manifest(folder)
    family = cache.set_family(manifest)
    stages = family.engine_stages(split)
    g = (geometry(family) if callable(geometry) else geometry) or default_geometry(manifest)
    found = cache.find_engines(engines, chosen, api.folder, precision, g.width, g.height, g.batch, g.context, stages,
                               g.references)
    return EngineSet(gpu, api, precision, found, family, stages)
