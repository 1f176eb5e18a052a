"""StageTimes: perf_counter on the CPU; on CUDA, events and no host synchronisation until the times are read."""
import time

import pytest
import torch

from kontext_trt.core.timing import StageTimes


def test_cpu_times_each_call():
    times = StageTimes()
    for _ in range(3):
        with times("transformer"):
            time.sleep(0.01)
    with times("vae_decoder", torch.device("cpu")):
        pass
    seconds = times.seconds
    assert len(seconds["transformer"]) == 3 and all(0.009 < s < 1 for s in seconds["transformer"])
    assert len(seconds["vae_decoder"]) == 1 and times.totals()["transformer"] == pytest.approx(sum(seconds["transformer"]))
    assert times.table().splitlines()[1].split()[:2] == ["transformer", "3"]


class FakeEvent:
    """Stands in for torch.cuda.Event: record() stamps a fake device clock, elapsed_time answers milliseconds."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None

    def record(self) -> None:
        FakeEvent.clock += 2.5
        self.at = FakeEvent.clock

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.at - self.at


def test_cuda_records_events_and_waits_once_when_read(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    times = StageTimes()
    for _ in range(4):  # a denoising loop: no host wait inside
        with times("transformer", "cuda"):
            pass
    assert syncs == [] and len(times.events["transformer"]) == 4
    assert times.seconds["transformer"] == [pytest.approx(2.5e-3)] * 4 and len(syncs) == 1
    assert times.totals()["transformer"] == pytest.approx(1e-2) and len(syncs) == 1  # events read once
    with times("transformer", "cuda"):
        pass
    assert len(times.seconds["transformer"]) == 5 and len(syncs) == 2
