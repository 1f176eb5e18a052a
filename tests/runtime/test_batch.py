"""flow.edit_batch: requests of one batch key run as one loop, each keeping its own seed and guidance."""
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
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
