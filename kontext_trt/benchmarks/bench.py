"""A whole benchmark: load the pipeline a LoadSpec names, run every configuration, one dict."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from kontext_trt.assemble import build_pipeline
from kontext_trt.benchmarks.harness import RunConfig, run_config
from kontext_trt.benchmarks.memory import engine_sizes
from kontext_trt.benchmarks.report import SCHEMA_VERSION
from kontext_trt.benchmarks.system import system_info
from kontext_trt.core.specs import LoadSpec
from kontext_trt.core.timing import progress
from kontext_trt.runtime.flow import default_steps
from kontext_trt.safety.guard import OutputPolicy

BACKENDS = ("torch", "onnxruntime")  # --backend choices; --engines selects the TensorRT runtime


def transformer_config(spec: LoadSpec) -> dict | None:
    """The checkpoint's transformer config (for the FLOP model), or None without a model."""
    if spec.model is None:
        return None
    from kontext_trt.core import checkpoint as ck

    return dict(ck.open_checkpoint(spec.model).transformer_config)


def run_bench(spec: LoadSpec, configs: list[RunConfig], warmup: int, iters: int,
              policy: OutputPolicy | None = None, quality: bool = False) -> dict:
    """Load the pipeline once (assemble.build_pipeline), run every configuration with a progress line each (through the
    safety policy's checks and watermark when given; with `quality`, cached configurations against uncached), and
    assemble the results. A configuration without steps runs the model's default (flow.default_steps), recorded."""
    source = spec.engines or spec.onnx or spec.model
    with progress(f"loading {source} ({spec.backend}, {spec.dtype}, {spec.device})"):
        k = build_pipeline(spec)
    system = system_info(k.device)
    dtype, precision = k.info.dtype, k.info.precision  # an export or engine set knows its own
    peak = (system["gpu"] or {}).get("peak_tflops", {}).get(precision)
    config = transformer_config(spec)
    configs = [cfg if cfg.steps is not None else replace(cfg, steps=default_steps(k)) for cfg in configs]
    runs = []
    for i, cfg in enumerate(configs, 1):
        with progress(f"[{i}/{len(configs)}] {cfg.label}, {cfg.steps} steps, {warmup} warm-up + {iters} timed"):
            runs.append(run_config(k, cfg, warmup, iters, config, peak, policy, quality))
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "system": system,
        "target": {
            "backend": k.info.backend, "model": spec.model and spec.model.name,
            "checkpoint": k.info.checkpoint, "onnx": spec.onnx and str(spec.onnx),
            "engines": spec.engines and str(spec.engines), "dtype": dtype, "precision": precision,
            "device": str(k.device), "transformer_config": config, "loras": list(k.info.loras),
        },
        "settings": {"warmup": warmup, "iters": iters},
        "engine_sizes_bytes": engine_sizes(spec.engines),
        "runs": runs,
    }
