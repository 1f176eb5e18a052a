"""Prometheus metrics of one server (its own registry): requests by status, queue depth, batch sizes, per-stage
latency and, where there is a GPU, its memory."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kontext_trt.safety.checker import ContentFlagged

if TYPE_CHECKING:
    from kontext_trt.serve.service import BatchRun

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kontext_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("kontext_queue_depth", "requests waiting for a batch", registry=r)
        self.batch_size = Histogram("kontext_batch_size", "images per batch run", buckets=BATCH_BUCKETS, registry=r)
        self.stage_latency = Histogram("kontext_stage_seconds", "seconds per batch in each stage (clip, t5, "
                                       "vae_encoder, transformer, vae_decoder), and per request in queue and in total",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.flagged = Counter("kontext_safety_flagged", "images the safety checker flagged, by where (input, "
                               "output) and label", ["where", "label"], registry=r)
        self.lora_swaps = Counter("kontext_lora_swaps", "times the transformer's LoRA set was swapped between "
                                  "batches", registry=r)
        self.cancelled = Counter("kontext_batches_cancelled", "batches stopped between denoising steps because every "
                                 "request in them was cancelled (timeout, client gone)", registry=r)
        self.gpu_memory = Gauge("kontext_gpu_memory_bytes", "GPU memory: used and total on the device, allocated "
                                "by torch", ["kind"], registry=r)

    def observe_batch(self, images: int, run: BatchRun) -> None:
        """Record one batch: its size, and the seconds it spent in each stage and in all."""
        self.batch_size.observe(images)
        self.lora_swaps.inc(run.lora_swaps)
        for stage, seconds in run.stage_seconds.items():
            self.stage_latency.labels(stage).observe(seconds)
        self.stage_latency.labels("batch").observe(run.seconds)

    def observe_flagged(self, flagged: ContentFlagged) -> None:
        """Count each flagged image once per label it was flagged for."""
        where = "input" if flagged.what.startswith("input") else "output"
        for verdict in flagged.verdicts:
            for label in verdict.labels:
                self.flagged.labels(where, label).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition, GPU memory read now."""
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            self.gpu_memory.labels("used").set(total - free)
            self.gpu_memory.labels("total").set(total)
            self.gpu_memory.labels("torch_allocated").set(torch.cuda.memory_allocated())
        return generate_latest(self.registry)
