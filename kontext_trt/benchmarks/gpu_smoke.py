"""GPU smoke test of the TensorRT backend on the tiny synthetic checkpoint: build, edit, compare, time.

    python -m kontext_trt.benchmarks.gpu_smoke [--work out/gpu-smoke] [--steps 8] [--iters 3] [--atol 1e-3]

On a host with an NVIDIA GPU and TensorRT (TensorRT-RTX on an RTX GPU): writes the tiny checkpoint, exports it to
fp32 ONNX and builds two engine sets for this GPU (strict fp32: NVIDIA_TF32_OVERRIDE=0): a plain one for the
resident and low-VRAM modes, one with a weight-streaming transformer for the streaming modes (on TensorRT-RTX a
streaming engine takes no user-allocated memory, so its contexts cannot be stream-captured: the plain set keeps the
torch-graph path tested there); all are reused on a re-run. Then, per memory mode with and
without CUDA graphs, one warm-up and `iters` timed edits (two prompts on one 128x128 image), printing the max
|latents - ONNX Runtime (CPU)|, per-stage latency, device memory and what the graph wrapper did.
Exit 0 when every mode is within --atol of ONNX Runtime, 1 when one is not (or could not be checked: a streaming
engine with no streamable weights), 2 without a usable GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

from kontext_trt.core.errors import KontextError

SIZE = 128
MODES = (  # label, runtime.pipeline.load_engines options, CUDA graphs
    ("resident", {}, False),
    ("resident + graphs", {}, True),
    ("low-vram", {"low_vram": True}, False),
    ("low-vram + graphs", {"low_vram": True}, True),
    ("weight streaming 1/2", {"weight_budget": "half"}, False),
    ("weight streaming 1/2 + graphs", {"weight_budget": "half"}, True),
)


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """The tiny checkpoint's fp32 export and this GPU's engines under work (each made once): (onnx, plain engines,
    engines with a weight-streaming transformer)."""
    from kontext_trt.core.export_manifest import read_export_manifest
    from kontext_trt.core.stages import STAGE_NAMES
    from kontext_trt.engines import build, device, profiles
    from kontext_trt.export.export import export_checkpoint
    from kontext_trt.synth import write_synthetic_checkpoint

    ckpt, onnx, engines, streaming = (work / name for name in ("tiny-checkpoint", "onnx", "engines", "engines-ws"))
    if not (ckpt / "model_index.json").exists():
        write_synthetic_checkpoint(ckpt, preset="tiny", seed=0, force=True)
    manifest = read_export_manifest(onnx)
    if manifest is None or set(manifest.stages) != set(STAGE_NAMES):
        export_checkpoint(ckpt, onnx, dtype="fp32", force=True)
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # strict fp32 kernels, as the comparison assumes
    gpu, why = device.detect_gpu()
    sku = device.resolve_sku("auto", gpu, why)
    shapes = profiles.Shapes(profiles.parse_sizes(f"{SIZE}x{SIZE}"), profiles.parse_batch("1-2"))
    for out, streams in ((engines, False), (streaming, True)):  # as `kontext-trt build` would, with --weight-streaming
        build.build_set(build.BuildRequest(onnx, out, sku, build.Target(sku.flavor, (sku.sm,), gpu.sm if gpu else None),
                                           shapes=shapes, flags=build.BuildFlags(weight_streaming=streams),
                                           gpu=gpu is not None))
    return onnx, engines, streaming


def timed_edits(k, req, iters: int) -> tuple[object, float]:
    """One warm-up edit (captures graphs, JIT-compiles RTX kernels), then `iters` timed: (last result, mean ms)."""
    from kontext_trt.runtime.flow import edit

    edit(k, req)
    k.reset_times()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        result = edit(k, req)
    torch.cuda.synchronize()
    return result, 1e3 * (time.perf_counter() - start) / iters


def run_mode(engines: Path, onnx: Path, req, reference: torch.Tensor, options: dict, graphs: bool,
             iters: int) -> tuple[float, str]:
    """Load the engines in one mode, time the edits; (max |latents - reference|, the report lines)."""
    from kontext_trt.assemble import build_pipeline, request_geometry
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.engines.trt_stages import memory_summary

    torch.cuda.reset_peak_memory_stats()
    k = build_pipeline(LoadSpec(None, backend="tensorrt", engines=engines, precision="fp32", onnx=onnx, cuda_graphs=graphs, **options), request_geometry(req))
    result, ms = timed_edits(k, req, iters)
    diff = (result.latents.cpu() - reference).abs().max().item()
    lines = [f"max |latents - onnxruntime| {diff:.2e}, {ms:.1f} ms per edit", k.times.table(), memory_summary(k.stages)]
    if graphs:
        lines.append(f"cuda graphs: {k.graphs['transformer'].stats()}")
    k.stages["transformer"].pool.release()
    del k
    gc.collect()
    torch.cuda.empty_cache()
    return diff, "\n".join(lines)


def streamable_half(engines: Path, onnx: Path, req) -> int:
    """Half the transformer engine's streamable weights (the weight-streaming modes' budget)."""
    from kontext_trt.assemble import build_pipeline, request_geometry
    from kontext_trt.core.specs import LoadSpec

    spec = LoadSpec(None, backend="tensorrt", engines=engines, precision="fp32", onnx=onnx, low_vram=True)
    k = build_pipeline(spec, request_geometry(req))
    stage = k.stages["transformer"]
    stage.pool.admit(stage)
    half = int(stage.engine.streamable_weights_size) // 2
    stage.pool.release()
    return half


def smoke(work: Path, steps: int, iters: int, atol: float) -> int:
    """Build, then run every mode against ONNX Runtime; the exit code."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core import image as im
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.engines.select import cuda_gpu
    from kontext_trt.runtime.flow import EditRequest, edit

    gpu = cuda_gpu()
    print(f"GPU: {gpu.name} (sm{gpu.sm}, {gpu.memory_gib:.0f} GiB)")
    onnx, engines, streaming = prepare(work)
    req = EditRequest(prompts=["make the house blue", "add snow on the roof"], image=im.sample_image(SIZE, SIZE),
                      steps=steps, seed=7, auto_resize=False)
    reference = edit(build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=onnx)), req).latents
    half = streamable_half(streaming, onnx, req)
    failed = []
    for label, options, graphs in MODES:
        if "weight_budget" in options and half == 0:  # a budget of 0 would be refused as 'nothing streams'
            print(f"\n== {label}\nnot checked: the transformer engine in {streaming} was built with "
                  "--weight-streaming but has no streamable weights (TensorRT kept them all on the device)")
            failed.append(f"{label} (not checked)")
            continue
        options = {key: half if value == "half" else value for key, value in options.items()}
        diff, report = run_mode(streaming if "weight_budget" in options else engines, onnx, req, reference, options,
                                graphs, iters)
        print(f"\n== {label}\n{report}")
        if not diff <= atol:
            failed.append(label)
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all modes'} within {atol:g} of onnxruntime")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.gpu_smoke", description=__doc__)
    p.add_argument("--work", type=Path, default=Path("out/gpu-smoke"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--atol", type=float, default=1e-3)
    args = p.parse_args(argv)
    try:
        return smoke(args.work, args.steps, args.iters, args.atol)
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
