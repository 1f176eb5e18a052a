"""flow.edit_batch: requests of one batch key run as one loop, each keeping its own seed and guidance; a batch whose
requests were all cancelled stops between steps."""
import threading

import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.errors import Cancelled, KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime import flow


@pytest.fixture(scope="module")
def k32(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))


def request(**kw):
    base = dict(prompts=["add a moon"], image=im.sample_image(96, 64), steps=2, auto_resize=False)
    return flow.EditRequest(**{**base, **kw})


def test_batched_requests_equal_each_request_alone(k32):
    reqs = [request(seed=4, guidance=2.0), request(prompts=["add snow", "add rain"], seed=5, guidance=4.0,
                                                   image=im.sample_image(96, 64, seed=3))]
    batched = flow.edit_batch(k32, reqs)
    assert [len(r.images) for r in batched] == [1, 2]
    for got, req in zip(batched, reqs):
        alone = flow.edit(k32, req)
        torch.testing.assert_close(got.latents, alone.latents, atol=1e-4, rtol=0)
        assert got.metadata == alone.metadata


def test_batch_mates_keep_their_own_seed_and_guidance(k32):
    a, b, c = flow.edit_batch(k32, [request(seed=1), request(seed=2), request(seed=1, guidance=5.0)])
    assert not torch.allclose(a.latents, b.latents, atol=1e-3)
    assert not torch.allclose(a.latents, c.latents, atol=1e-3)


def test_requests_of_different_keys_are_refused(k32):
    with pytest.raises(KontextError, match="must share output size"):
        flow.edit_batch(k32, [request(), request(steps=3)])


class CancelAfter:
    """A transformer that sets `event` after `calls` calls, counting them: a client that gives up mid-edit."""

    def __init__(self, stage, event: threading.Event, calls: int) -> None:
        self.stage, self.event, self.after, self.calls = stage, event, calls, 0

    def __call__(self, **inputs):
        self.calls += 1
        if self.calls == self.after:
            self.event.set()
        return self.stage(**inputs)


def test_a_batch_all_cancelled_stops_before_the_next_step(k32):
    a, b = threading.Event(), threading.Event()
    b.set()  # one request gave up before the run, the other gives up during step 3
    counting = CancelAfter(k32.stages["transformer"], a, 3)
    k = k32.with_stages(transformer=counting)
    with pytest.raises(Cancelled) as caught:
        flow.edit_batch(k, [request(steps=50, seed=1, cancel=a), request(steps=50, seed=2, cancel=b)])
    assert counting.calls == 3  # the step that was running finished; none after it
    assert caught.value.code == "cancelled" and "after 3 of 50 steps" in caught.value.message


def test_a_batch_partly_cancelled_runs_on_for_the_others(k32):
    gone, alive = threading.Event(), threading.Event()
    gone.set()
    reqs = [request(seed=1, cancel=gone), request(seed=2, cancel=alive)]
    done = flow.edit_batch(k32, reqs)
    plain = flow.edit_batch(k32, [request(seed=1), request(seed=2)])
    for got, want in zip(done, plain):
        torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)
    assert flow.stopper([request(), request(cancel=gone)]) is None  # a request without an event is never cancelled
