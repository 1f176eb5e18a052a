"""CUDA graphs and weight streaming on the TensorRT stage per flavour, without a GPU (stand-ins: engines/fake_trt.py):
datacenter TensorRT has no is_stream_capturable, so its capturability is found by trying the capture; a streaming
engine is never captured (on either flavour); its resident weights leave out what streams."""
import logging

import pytest
import torch

from kontext_trt.engines import fake_trt, trt_api, trt_pool
from kontext_trt.engines import trt_stages as ts
from kontext_trt.runtime.cudagraphs import GraphedStage

pytest.importorskip("tensorrt_rtx")
RTX = trt_api.load_api("tensorrt-rtx")
DATACENTER = trt_api.TrtApi("tensorrt", fake_trt.fake_tensorrt("10.14.1.48"))


class RefusingCapture:
    """runtime.cudagraphs' capture backend on a host without a GPU: warm-up runs the call, capture fails as CUDA does
    when a library synchronises inside a capture."""

    def warm_up(self, call):
        call()
        call()

    def capture(self, call):
        raise RuntimeError("operation not permitted when stream is capturing")

    def replay(self, handle):
        raise AssertionError("nothing was captured")


def test_datacenter_tensorrt_graphs_never_ask_is_stream_capturable(fake_engines, trt_stages, transformer_inputs,
                                                                   caplog):
    """--cuda-graphs on datacenter TensorRT: no AttributeError mid-edit; the capture is tried and, when it fails,
    the shape runs eagerly with the reason in the log and the stats."""
    stage = trt_stages(trt_pool.EnginePool(DATACENTER, torch.device("cpu")), transformer={"cuda_graphs": True})[
        "transformer"]
    assert not hasattr(fake_trt.FakeContext, "is_stream_capturable")  # the datacenter fake is honest
    first = stage(**transformer_inputs())
    assert first["latent"].shape == (2, 40, 64) and not stage.native_graphs
    assert stage.graph_refusal() is None  # TensorRT cannot tell: runtime.cudagraphs tries the capture
    assert [type(c) for c in fake_engines.made] == [fake_trt.FakeContext]
    graphed = GraphedStage(stage, backend=RefusingCapture())
    with caplog.at_level(logging.WARNING, logger="kontext_trt.runtime.cudagraphs"):
        for _ in range(3):
            out = graphed(**transformer_inputs())
    assert out["latent"].shape == (2, 40, 64)
    stats = graphed.stats()
    assert stats["eager"] == 3 and stats["captures"] == 0
    assert stats["refusals"] == ["capture failed: operation not permitted when stream is capturing"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "transformer runs eagerly" in warnings[0] and "capture failed" in warnings[0]


@pytest.mark.parametrize("api", [RTX, DATACENTER], ids=["tensorrt-rtx", "tensorrt"])
def test_streaming_engine_runs_eagerly_with_the_reason(api, fake_engines, trt_stages, transformer_inputs):
    """A budget below the streamable weights: TensorRT's enqueue is synchronous and not capturable, so neither
    torch's capture nor TensorRT-RTX's own graphs are used; the stage says why."""
    engine = fake_engines.engines["transformer"]
    engine.streamable_weights_size, engine._capturable = 10_000, False
    pool = trt_pool.EnginePool(api, torch.device("cpu"), streaming=True)
    stage = trt_stages(pool, transformer={"weight_budget": 5_000, "cuda_graphs": True})["transformer"]
    for _ in range(2):
        stage(**transformer_inputs())
    assert not stage.native_graphs and [c["native_graphs"] for c in fake_engines.contexts] == [False]
    refusal = stage.graph_refusal()
    assert "streams weights (budget 5000 of 10000 streamable bytes)" in refusal
    graphed = GraphedStage(stage, backend=RefusingCapture())
    graphed(**transformer_inputs())
    assert graphed.stats()["refusals"] == [refusal] and graphed.stats()["eager"] == 1


def test_budget_covering_every_weight_does_not_stream(fake_engines, trt_stages, transformer_inputs):
    """A budget of all the streamable weights disables streaming: graphs are asked for as usual."""
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    pool = trt_pool.EnginePool(DATACENTER, torch.device("cpu"), streaming=True)
    stage = trt_stages(pool, transformer={"weight_budget": 2**30, "cuda_graphs": True})["transformer"]
    stage(**transformer_inputs())
    assert stage.budget_bytes == 10_000 and not stage.streams_weights() and stage.graph_refusal() is None


@pytest.mark.parametrize("api", [RTX, DATACENTER], ids=["tensorrt-rtx", "tensorrt"])
def test_resident_weights_leave_out_what_streams(api, fake_engines, trt_stages, monkeypatch):
    """The free-memory reading across the load saw all 12 000 weight bytes on the device (before the budget applied);
    with 10 000 streamable and a budget of 3 000, only 12 000 - 7 000 stay resident."""
    engine = fake_engines.engines["transformer"]
    engine.streamable_weights_size, engine._total_weights = 10_000, 12_000
    readings = iter([(10**9, 2 * 10**9), (10**9 - 12_000 - 4096, 2 * 10**9)])  # before, after (+ the 4 KiB scratch)
    monkeypatch.setattr(ts, "device_memory", lambda device: next(readings))
    pool = trt_pool.EnginePool(api, torch.device("cpu"), streaming=True)
    stage = trt_stages(pool, transformer={"weight_budget": 3_000})["transformer"]
    pool.admit(stage)
    stats = stage.memory_stats()
    assert stats["weights_device_bytes"] == 5_000 and stats["weight_streaming_budget_bytes"] == 3_000
    assert pool.resident_bytes() == 5_000 + pool.scratch_bytes


def test_resident_weights_measured_when_nothing_streams(fake_engines, trt_stages, monkeypatch):
    readings = iter([(10**9, 2 * 10**9), (10**9 - 12_000 - 4096, 2 * 10**9)])
    monkeypatch.setattr(ts, "device_memory", lambda device: next(readings))
    pool = trt_pool.EnginePool(DATACENTER, torch.device("cpu"))
    stage = trt_stages(pool)["transformer"]
    pool.admit(stage)
    assert stage.memory_stats()["weights_device_bytes"] == 12_000
