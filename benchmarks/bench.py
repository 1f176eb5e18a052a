"""A whole benchmark: load a target (backend + checkpoint, or engines), run every configuration, one dict."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kontext_trt.benchmarks.harness import RunConfig, run_config
from kontext_trt.benchmarks.memory import engine_sizes
from kontext_trt.benchmarks.report import SCHEMA_VERSION
from kontext_trt.benchmarks.system import system_info
from kontext_trt.runtime.flow import Kontext
from kontext_trt.runtime.timing import progress
from kontext_trt.safety.guard import OutputPolicy

BACKENDS = ("torch", "onnxruntime")  # --backend choices; --engines selects the TensorRT runtime


@dataclass(frozen=True)
class Target:
    """What is measured: a backend over a checkpoint (plus exported ONNX), or a folder of TensorRT engines."""

    backend: str
    model: Path | None
    dtype: str = "bf16"
    device: str = "cpu"
    onnx: Path | None = None
    engines: Path | None = None
    precision: str | None = None  # the engine set's (default: the only one built)
    sku: str = "auto"
    loras: tuple[tuple[Path, float], ...] = ()  # transformer LoRAs applied before measuring (runtime.lora)
    split: bool = False  # engines: load the transformer's three parts (step caching) instead of the single engine

    def load(self) -> Kontext:
        """The pipeline, through runtime.pipeline.load_kontext."""
        from kontext_trt.runtime.pipeline import load_kontext

        if self.engines is not None:
            return load_kontext(self.model, backend="tensorrt", onnx=self.onnx, engines=self.engines,
                                precision=self.precision, sku=self.sku, loras=self.loras, split=self.split)
        return load_kontext(self.model, backend=self.backend, dtype=self.dtype, device=self.device, onnx=self.onnx,
                            loras=self.loras)

    def transformer_config(self) -> dict | None:
        """The checkpoint's transformer config (for the FLOP model), or None without --model."""
        if self.model is None:
            return None
        from kontext_trt.runtime import checkpoint as ck

        return dict(ck.open_checkpoint(self.model).transformer_config)


def run_bench(target: Target, configs: list[RunConfig], warmup: int, iters: int,
              policy: OutputPolicy | None = None, quality: bool = False) -> dict:
    """Load the target once, run every configuration with a progress line each (through the safety policy's checks
    and watermark when given; with `quality`, cached configurations against uncached), and assemble the results."""
    source = target.engines or target.onnx or target.model
    with progress(f"loading {source} ({target.backend}, {target.dtype}, {target.device})"):
        k = target.load()
    system = system_info(k.device)
    dtype, precision = k.info.dtype, k.info.precision  # an export or engine set knows its own
    peak = (system["gpu"] or {}).get("peak_tflops", {}).get(precision)
    config = target.transformer_config()
    runs = []
    for i, cfg in enumerate(configs, 1):
        with progress(f"[{i}/{len(configs)}] {cfg.label}, {cfg.steps} steps, {warmup} warm-up + {iters} timed"):
            runs.append(run_config(k, cfg, warmup, iters, config, peak, policy, quality))
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "system": system,
        "target": {
            "backend": k.info.backend, "model": target.model and Path(target.model).name,
            "checkpoint": k.info.checkpoint, "onnx": target.onnx and str(target.onnx),
            "engines": target.engines and str(target.engines), "dtype": dtype, "precision": precision,
            "device": str(k.device), "transformer_config": config, "loras": list(k.info.loras),
        },
        "settings": {"warmup": warmup, "iters": iters},
        "engine_sizes_bytes": engine_sizes(target.engines),
        "runs": runs,
    }
