"""Back-pressure, timed: 429 with Retry-After on a full queue, and 504 past the timeout with batch-mates served. Both
time queueing in fractions of a second, so each runs alone (`serial`); the untimed faults are in test_faults.py."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import SlowStage, app_in_thread, post

from kontext_trt.safety.guard import OutputPolicy


@pytest.mark.serial  # queueing timed in tenths of seconds: no other test beside it
def test_full_queue_answers_429_with_retry_after(tiny_pipeline, sample_png):
    png = sample_png.read_bytes()
    slow = {"transformer": lambda stage: SlowStage(stage, 0.5)}
    with app_in_thread(tiny_pipeline, slow, max_batch=1, max_queue=1) as url:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[post(client, url, png, 0.05 * i, seed=str(i)) for i in range(5)])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 'kontext_requests_total{endpoint="/v1/images/edits",status="429"}' in httpx.get(f"{url}/metrics").text


@pytest.mark.serial  # a timeout timed in seconds: no other test beside it
def test_timeout_answers_504_and_batch_mates_are_served(tiny_pipeline, sample_png):
    # A arrives at 0 (deadline 4s), B at 3s fills the batch of 2, which runs ~3s: A times out mid-run, B (deadline
    # 7s) gets its image.
    png = sample_png.read_bytes()
    slow = {"transformer": lambda stage: SlowStage(stage, 1.25)}
    # No safety checker: these timings budget the stages alone (NudeNet adds ~0.2-0.4 s per call on a busy CPU).
    no_checker = OutputPolicy(None, "none")
    with app_in_thread(tiny_pipeline, slow, max_batch=2, window_s=30, timeout_s=4, policy=no_checker) as url:
        async def pair():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(post(client, url, png, seed="1"), post(client, url, png, 3.0, seed="2"))

        start = time.monotonic()
        late, mate = asyncio.run(pair())
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
        assert mate.status_code == 200 and mate.headers["x-batch-size"] == "2", mate.text
        assert time.monotonic() - start < 20
        again = httpx.post(f"{url}/v1/images/generations", timeout=60,
                           json={"prompt": "x", "size": "64x64", "steps": 1, "n": 2})
        assert again.status_code == 200
