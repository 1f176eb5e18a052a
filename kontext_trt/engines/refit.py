"""Refittable transformer engines (the single transformer and its step-cache parts): LoRA swaps on a built engine, by
the export's weight map (export/weight_map.py).

Build: REFIT_INDIVIDUAL with exactly the mapped weights marked refittable (the ONNX parser names a weight after its
initializer), so the rest of the graph stays as optimized as a plain build. Run: trt.Refitter.set_named_weights for
the initializers a LoRA set changes (and back to the exported values for those it no longer changes), streamed in
batches, each refit_cuda_engine_async on the runtime's stream (see refit). Refit writes the new values into the engine's own weight memory, so
the addresses captured CUDA graphs point at stay valid.

fp8/nvfp4 engines are refused: their weights are quantized with calibrated scales, so a refit would need
re-quantization; build a bf16/fp32 engine with --refit to swap LoRAs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.engines import trt_api

QUANTIZED = ("fp8", "nvfp4")
REFIT_BATCH_BYTES = 2**30  # host bytes of new weights staged for one refit call (a whole LoRA set can be ~22 GB)


def export_entry(onnx_path: Path) -> dict | None:
    """The export manifest's entry of the stage whose ONNX file this is (None outside an export folder)."""
    folder = Path(onnx_path).parent.parent
    manifest = read_export_manifest(folder)
    for entry in (manifest.stages if manifest else {}).values():
        if (folder / entry["file"]).resolve() == Path(onnx_path).resolve():
            return entry
    return None


def refittable_names(onnx_path: Path) -> list[str]:
    """The initializers a LoRA can change (the weight map's), refusing quantized and unmapped exports in one line."""
    entry = export_entry(onnx_path) or {}
    if entry.get("precision") in QUANTIZED:
        raise KontextError(f"{onnx_path} is {entry['precision']}: refitting quantized weights needs re-quantization, "
                           f"which kontext-trt does not do; build a bf16 or fp32 engine with --refit to swap LoRAs")
    if not entry.get("weights"):
        raise KontextError(f"{onnx_path}: its export manifest has no weight map for it (its stage's `weights`); "
                           f"re-export it with this version of kontext-trt export, then build --refit")
    return sorted({w["name"] for w in entry["weights"].values()})


def mark_refittable(api: trt_api.TrtApi, network: Any, config: Any, onnx_path: Path) -> int:
    """Make the mapped weights of a parsed transformer network refittable (REFIT_INDIVIDUAL); returns how many."""
    names = refittable_names(onnx_path)
    missing = [name for name in names if not network.mark_weights_refittable(name)]
    if len(missing) == len(names):
        raise KontextError(f"{onnx_path}: {api.folder} found none of the weight map's {len(names)} weights in the "
                           f"parsed network ({missing[0]}, ...); re-export, then build --refit")
    config.set_flag(api.trt.BuilderFlag.REFIT_INDIVIDUAL)
    return len(names) - len(missing)


def refit(api: trt_api.TrtApi, engine: Any, weights: Iterable[tuple[str, torch.Tensor]], planned: Collection[str],
          current: Callable[[str], torch.Tensor], stream: Any, device: torch.device) -> tuple[int, float]:
    """Refit (initializer name, contiguous host tensor in the ONNX layout and dtype) pairs; returns (weights refit,
    seconds until the device has them).

    Streamed: a batch of about REFIT_BATCH_BYTES of host tensors is refit, then unset and dropped (the refitter takes
    host weights until refit_cuda_engine_async returns and keeps them set for the next refit otherwise: NvInferRuntime.h,
    IRefitter), so a LoRA over a 12B transformer never stages all its weights at once. `planned`: every name this call
    sets; a batch stays open while a weight TensorRT refits together with one set (get_missing_weights) is still to
    come, and one that is not planned gets its value now, `current(name)` (an unmapped bias beside a mapped weight).
    Ordered: each refit runs on `stream` (a torch stream) after the work queued on torch's current stream, CUDA-graph
    replays of this engine included (refitting while the engine has work queued on another stream is undefined:
    IRefitter::refitCudaEngineAsync), and that stream waits for it."""
    trt = api.trt
    dtypes = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16}
    refitter = trt.Refitter(engine, trt_api._logger(api))
    pending, batch, count, start = set(planned), {}, 0, time.perf_counter()

    def put(name: str, value: torch.Tensor) -> None:
        if not refitter.set_named_weights(name, trt.Weights(dtypes[value.dtype], value.data_ptr(), value.numel())):
            raise KontextError(f"the engine refused new weights for {name}: {trt_api.take_errors(api)}; rebuild it "
                               f"with kontext-trt build --refit from this export")
        batch[name] = value

    def flush() -> None:
        for name in refitter.get_missing_weights():
            put(name, current(name))
        missing = refitter.get_missing_weights()
        if missing:
            raise KontextError(f"refitting the engine also needs {missing[0]} ({len(missing)} missing): "
                               f"{trt_api.take_errors(api)}")
        queued = torch.cuda.current_stream(device)
        stream.wait_stream(queued)
        ran = refitter.refit_cuda_engine_async(stream.cuda_stream)
        queued.wait_stream(stream)
        if not ran:
            raise KontextError(f"refitting the engine failed: {trt_api.take_errors(api)}")
        for name in batch:
            refitter.unset_named_weights(name)
        batch.clear()

    for name, value in weights:
        pending.discard(name)
        put(name, value)
        count += 1
        if sum(v.nbytes for v in batch.values()) >= REFIT_BATCH_BYTES and not pending & set(
                refitter.get_missing_weights()):
            flush()
    if batch:
        flush()
    stream.synchronize()
    return count, time.perf_counter() - start
