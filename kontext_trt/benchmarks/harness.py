"""Run the flow loop (runtime.flow.edit) over configurations and summarise its per-stage times.

Per stage the samples are the loop's own timings (`Kontext.times`): one per call, so the transformer gives
`steps` samples per edit (per-step latency) and every other stage one. On CUDA the loop's timer records CUDA
events (no host sync between stages), on CPU it reads perf_counter. End to end is wall clock around
`edit`, synchronised on CUDA. Warm-up edits are run first, reported, and left out of every statistic.
"""
from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kontext_trt.assemble import with_cuda_graphs
from kontext_trt.benchmarks.flops import achieved, step_flops
from kontext_trt.benchmarks.memory import memory_report, reset_peaks
from kontext_trt.core import image as im
from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.stages import TRANSFORMER_PARTS
from kontext_trt.core.timing import bar
from kontext_trt.runtime.flow import EditRequest, Kontext, edit, request
from kontext_trt.safety import guard
from kontext_trt.safety.guard import CHECK_STAGE, MARK_STAGE, OutputPolicy

PROMPT = "make the house blue and add snow on the roof"
SAFETY_STAGES = (CHECK_STAGE, MARK_STAGE)  # timed after the model family's own stages


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration: output size (= each reference image's size), batch, steps (None: the model's
    default, filled in by bench.run_bench before it runs), CUDA graphs, step cache and the number of reference
    images (FLUX.2 [klein]: 1 to 4)."""

    width: int
    height: int
    batch: int
    steps: int | None
    cuda_graphs: bool
    cache: CacheSpec = field(default_factory=CacheSpec)  # the step cache (core/specs.py)
    references: int = 1

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        return (f"{self.width}x{self.height} b{self.batch}" + (" graphs" if self.cuda_graphs else "")
                + ("" if self.cache.policy == "off" else f" {self.cache}")
                + ("" if self.references == 1 else f" r{self.references}"))


def run_configs(sizes: list[tuple[int, int]], batches: list[int], steps: int | None, graphs: list[bool],
                caches: list[CacheSpec] = (CacheSpec(),), references: list[int] = (1,)) -> list[RunConfig]:
    """Every combination, sizes outermost, reference counts innermost."""
    return [RunConfig(w, h, b, steps, g, c, r)
            for (w, h), b, g, c, r in itertools.product(sizes, batches, graphs, caches, references)]


def summarize(seconds: list[float]) -> dict:
    """n, mean, min, p50, p95, p99, max in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": int(ms.size), "mean": float(ms.mean()), "min": float(ms.min()), "p50": float(p50),
            "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def one_edit(k: Kontext, req: EditRequest, policy: OutputPolicy | None = None
             ) -> tuple[float, dict[str, list[float]], dict]:
    """Wall-clock seconds of one edit (through the safety policy's checks and watermark when given), the seconds of
    each stage call in it and its step-cache report."""
    cuda = k.device.type == "cuda"
    k.reset_times()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = edit(k, req) if policy is None else guard.edit(k, req, policy)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return wall, k.times.seconds, result.metadata["cache"]


def roofline(transformer_config: dict | None, tokens: int, context_tokens: int, text_tokens: int, batch: int,
             step_seconds: float, peak: float | None) -> dict | None:
    """FLOP per transformer step (the FLOP model of the config's class) and what the measured step achieves."""
    if transformer_config is None:
        return None
    flops = step_flops(transformer_config, tokens, context_tokens, text_tokens, batch)["total"]
    return {"flops_per_step": flops, **achieved(flops, step_seconds, peak)}


def run_config(k: Kontext, cfg: RunConfig, warmup: int, iters: int, transformer_config: dict | None = None,
               peak_tflops: float | None = None, policy: OutputPolicy | None = None, quality: bool = False) -> dict:
    """Warm up, time `iters` edits of one configuration and summarise them (see the JSON schema's run); with
    `quality`, a cached configuration is also compared with the uncached edit of the same seed."""
    images = [im.sample_image(cfg.width, cfg.height, seed=i) for i in range(cfg.references)]
    req = request([PROMPT] * cfg.batch, images, steps=cfg.steps, auto_resize=False, cache=cfg.cache)
    stages = (*k.ops.family.stage_names, *SAFETY_STAGES)
    pipeline = with_cuda_graphs(k) if cfg.cuda_graphs else k
    reset_peaks(k.device)
    warm = [one_edit(pipeline, req, policy)[0] for _ in bar(range(warmup), "warm-up", unit="edit")]
    walls, calls = [], defaultdict(list)
    per_edit = defaultdict(list)  # stage -> seconds summed within each edit
    for _ in bar(range(iters), "timed", unit="edit"):
        wall, seconds, cache = one_edit(pipeline, req, policy)
        walls.append(wall)
        for name, values in seconds.items():
            calls[name] += values
            per_edit[name].append(sum(values))
    breakdown = {name: 1e3 * float(np.mean(per_edit[name])) for name in stages if name in per_edit}
    breakdown["other"] = max(0.0, 1e3 * float(np.mean(walls)) - sum(breakdown.values()))
    tokens = (cfg.width // 16) * (cfg.height // 16)  # per image (both families pack 16x16 pixels into a token)
    context = cfg.references * tokens
    step_s = float(np.median(calls["transformer"]))  # with a step cache: the whole step, cached or computed
    run = {
        **asdict(cfg),
        "cache": cache,
        "tokens": {"target": tokens, "context": context, "text": k.config.text_length},
        "warmup": {"iters": warmup, "e2e_ms": [1e3 * w for w in warm]},
        "iters": iters,
        "e2e_ms": summarize(walls),
        "images_per_s": cfg.batch / float(np.mean(walls)),
        "stages_ms": {name: summarize(calls[name]) for name in (*stages, *TRANSFORMER_PARTS) if name in calls},
        "breakdown_ms": breakdown,
        "roofline": (roofline(transformer_config, tokens, context, k.config.text_length, cfg.batch, step_s,
                              peak_tflops)
                     if cfg.cache.policy == "off" else None),
        "memory": memory_report(k.stages, k.device),
    }
    if quality and cfg.cache.policy != "off":
        from kontext_trt.benchmarks.cache_quality import cache_quality

        run["quality"] = cache_quality(pipeline, req)
    return run
