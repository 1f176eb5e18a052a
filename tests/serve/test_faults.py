"""Back-pressure and faults: 429 with Retry-After on a full queue, 504 past the timeout with batch-mates served, a
request that fails at run time answered 500 while the server lives on, SIGTERM drains in-flight requests, exit 0."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import FaultyTransformer, SlowStage, app_in_thread, server_process

from kontext_trt.safety.guard import OutputPolicy

EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false"}


async def post(client: httpx.AsyncClient, url: str, png: bytes, delay_s: float = 0.0, **fields) -> httpx.Response:
    await asyncio.sleep(delay_s)
    return await client.post(f"{url}/v1/images/edits", data={**EDIT, **fields},
                             files={"image": ("in.png", png, "image/png")})


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


def test_a_failing_request_does_not_fail_its_batch_or_the_server(tiny_pipeline, sample_png):
    png = sample_png.read_bytes()
    with app_in_thread(tiny_pipeline, {"transformer": FaultyTransformer}, max_batch=3, window_s=1.0) as url:
        async def trio():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(post(client, url, png, seed="1"), post(client, url, png, 0.1, guidance="13"),
                                            post(client, url, png, 0.2, seed="3"))

        good, bad, good2 = asyncio.run(trio())
        assert good.status_code == good2.status_code == 200
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        assert "injected fault" in bad.json()["error"]["message"]
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_ckpt, sample_png):
    png = sample_png.read_bytes()
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--drain-timeout", "60") as server:
        async def term_mid_flight():
            async with httpx.AsyncClient(timeout=120) as client:
                flight = asyncio.ensure_future(post(client, server.url, png, steps="12"))
                await asyncio.sleep(1.0)
                server.proc.send_signal(15)
                return await flight

        response = asyncio.run(term_mid_flight())
        assert response.status_code == 200
        assert server.proc.wait(60) == 0
        try:
            httpx.get(f"{server.url}/healthz", timeout=2)
            refused = False
        except httpx.ConnectError:
            refused = True
        assert refused
        output = server.proc.stdout.read()
        assert "Waiting for connections to close" in output or "Shutting down" in output
