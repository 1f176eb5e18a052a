"""serve_throughput, small: the figure is computed, and the model thread ran the model and nothing else (the
safety checks, watermarks and PNG encodes ran on the worker pool). No speed is asserted: that is the benchmark's."""
from __future__ import annotations

import math

import pytest

from kontext_trt.assemble import build_pipeline
from kontext_trt.benchmarks.serve_throughput import measure
from kontext_trt.core.specs import LoadSpec


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))


def test_throughput_figure_and_the_model_thread_runs_only_the_model(tiny_pipeline):
    fig = measure(tiny_pipeline, size=256, steps=3, step_ms=20, concurrency=4, requests=4, max_batch=2,
                  checker="none")
    assert math.isfinite(fig.ratio) and fig.ratio > 0
    assert math.isclose(fig.bound_images_per_s, 2 / (3 * 0.020))
    assert math.isclose(fig.images_per_s / fig.bound_images_per_s, fig.ratio)
    assert sum(size * count for size, count in fig.batches.items()) >= 4
    assert 0 < fig.model_thread_stage_s <= fig.model_thread_busy_s <= fig.seconds + 1e-6
    # the model thread: the load, then batches (EditService.run, timed), on its one thread
    assert set(fig.model_thread_calls) == {"EditService.load", "measure.<locals>.timed_run"}
    assert {t for threads in fig.model_thread_calls.values() for t in threads} == {"kontext-model_0"}
    # the pool: input checks, output checks with the watermark, PNG encoding; never the model thread
    assert set(fig.pool_calls) == {"EditService.admit", "EditService.finish", "response_body"}
    assert all(t.startswith("kontext-pool_") for threads in fig.pool_calls.values() for t in threads)
    assert "4 edits of 256x256" in fig.lines() and "ratio" in fig.lines()
