"""GPU smoke test of the TensorRT backend on tiny synthetic checkpoints: build, edit, compare, time.

    python -m kontext_trt.benchmarks.gpu_smoke [--work out/gpu-smoke] [--steps 8] [--iters 3] [--atol 1e-3]

On a host with an NVIDIA GPU and TensorRT (TensorRT-RTX on an RTX GPU): writes the tiny checkpoint, exports it to
fp32 ONNX and builds its engines for this GPU (strict fp32: NVIDIA_TF32_OVERRIDE=0) for the resident and low-VRAM
modes. The tiny transformer's weights are too small for TensorRT to stream any, so the weight-streaming modes run a
second checkpoint whose transformer is FLUX-wide per head (1024 hidden, 16 MiB weight matrices; WIDE), exported and
built with --weight-streaming; everything is reused on a re-run. Then, per memory mode with and without CUDA graphs,
one warm-up and `iters` timed edits (two prompts on one 128x128 image), printing the max |latents - ONNX Runtime
(CPU)| of the same export, per-stage latency, device memory and what the graph wrapper did (a streaming engine runs
eagerly, saying why: TensorRT cannot capture it). Exit 0 when every mode that ran is within --atol of ONNX Runtime
(a mode that cannot run here is skipped with the reason, e.g. an engine with no streamable weights), 1 when one is
not, 2 without a usable GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
# The streaming modes' transformer: FLUX's head size and 8 heads (1024 wide, MLP 4096: 16 MiB fp32 matrices), one
# block of each kind; text widths stay the tiny checkpoint's.
WIDE = {"attention_head_dim": 128, "num_attention_heads": 8, "num_layers": 1, "num_single_layers": 1,
        "axes_dims_rope": [16, 56, 56]}


@dataclass(frozen=True)
class EngineSet:
    """One checkpoint's export and engines."""

    onnx: Path
    engines: Path


def prepare(work: Path) -> tuple[EngineSet, EngineSet]:
    """This GPU's engines under work, each made once: (the tiny checkpoint's plain set, the WIDE checkpoint's set with
    a weight-streaming transformer)."""
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # strict fp32 kernels, as the comparison assumes
    return (engine_set(work / "tiny", None, streams=False), engine_set(work / "wide", WIDE, streams=True))


def engine_set(folder: Path, transformer: dict | None, streams: bool) -> EngineSet:
    """A synthetic checkpoint (tiny, with these transformer overrides), its fp32 export and its engines for this GPU
    (as `kontext-trt build`, with --weight-streaming when `streams`)."""
    from kontext_trt.core.export_manifest import read_export_manifest
    from kontext_trt.core.stages import STAGE_NAMES
    from kontext_trt.engines import build, device, profiles
    from kontext_trt.export.export import export_checkpoint
    from kontext_trt.synth import write_synthetic_checkpoint

    ckpt, onnx, engines = folder / "checkpoint", folder / "onnx", folder / "engines"
    if not (ckpt / "model_index.json").exists():
        write_synthetic_checkpoint(ckpt, preset="tiny", seed=0, force=True, transformer=transformer)
    manifest = read_export_manifest(onnx)
    if manifest is None or set(manifest.stages) != set(STAGE_NAMES):
        export_checkpoint(ckpt, onnx, dtype="fp32", force=True)
    gpu, why = device.detect_gpu()
    sku = device.resolve_sku("auto", gpu, why)
    shapes = profiles.Shapes(profiles.parse_sizes(f"{SIZE}x{SIZE}"), profiles.parse_batch("1-2"))
    build.build_set(build.BuildRequest(onnx, engines, sku, build.Target(sku.flavor, (sku.sm,), gpu.sm if gpu else None),
                                       shapes=shapes, flags=build.BuildFlags(weight_streaming=streams),
                                       gpu=gpu is not None))
    return EngineSet(onnx, engines)


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
    k = build_pipeline(LoadSpec(None, backend="tensorrt", engines=engines, precision="fp32", onnx=onnx,
                                cuda_graphs=graphs, **options), request_geometry(req))
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


def run_modes(run: Callable[[str, dict, bool], tuple[float, str]], half: int, streaming: Path,
              atol: float) -> tuple[list[str], list[str]]:
    """Every mode through `run(label, options, graphs) -> (max diff, report)`, printing each; (modes off by more
    than atol, modes skipped with their reason). The streaming modes are skipped when the streaming transformer has
    no streamable weights (a budget of 0 would be refused as 'nothing streams'), rather than failed."""
    failed, skipped = [], []
    for label, options, graphs in MODES:
        if "weight_budget" in options and half == 0:
            reason = (f"the transformer engine in {streaming} was built with --weight-streaming but has no "
                      "streamable weights (TensorRT kept them all on the device)")
            print(f"\n== {label}\nskipped: {reason}")
            skipped.append(f"{label}: {reason}")
            continue
        diff, report = run(label, {key: half if value == "half" else value for key, value in options.items()}, graphs)
        print(f"\n== {label}\n{report}")
        if not diff <= atol:
            failed.append(label)
    return failed, skipped


def smoke(work: Path, steps: int, iters: int, atol: float) -> int:
    """Build, then run every mode against ONNX Runtime; the exit code."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core import image as im
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.engines.select import cuda_gpu
    from kontext_trt.runtime.flow import EditRequest, edit

    gpu = cuda_gpu()
    print(f"GPU: {gpu.name} (sm{gpu.sm}, {gpu.memory_gib:.0f} GiB)")
    plain, streaming = prepare(work)
    req = EditRequest(prompts=["make the house blue", "add snow on the roof"], image=im.sample_image(SIZE, SIZE),
                      steps=steps, seed=7, auto_resize=False)
    references = {s: edit(build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=s.onnx)), req).latents
                  for s in (plain, streaming)}
    half = streamable_half(streaming.engines, streaming.onnx, req)

    def run(label: str, options: dict, graphs: bool) -> tuple[float, str]:
        chosen = streaming if "weight_budget" in options else plain
        return run_mode(chosen.engines, chosen.onnx, req, references[chosen], options, graphs, iters)

    failed, skipped = run_modes(run, half, streaming.engines, atol)
    ran = len(MODES) - len(skipped)
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else f'all {ran} modes run'} within {atol:g} of onnxruntime"
          + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
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
