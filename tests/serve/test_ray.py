"""`kontext-trt serve --ray` with 2 CPU replicas on a local Ray: both replicas answer, concurrent edits all succeed
with their own seeds, a burst past --max-queue gets 429 in OpenAI's shape with Retry-After (the rest 200), and
SIGTERM drains an edit in flight (200) before the deployment shuts down and the server exits 0."""
from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from conftest import ServerProcess, wait_healthy
from PIL import Image


@pytest.mark.slow  # a local Ray cluster and two replicas: ~40 s
def test_two_cpu_replicas_serve_the_same_app(tiny_ckpt, sample_png):
    start = time.monotonic()
    server = ServerProcess("--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--model", str(tiny_ckpt),
                           "--dtype", "fp32", "--batch-window-ms", "200", "--max-queue", "1", "--drain-timeout", "60",
                           env={"RAY_USAGE_STATS_ENABLED": "0"})
    try:
        wait_healthy(server.url, server.proc)
        pids, deadline = set(), time.monotonic() + 60  # the proxy learns of each replica once it is up
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(httpx.get(f"{server.url}/healthz", timeout=10).json()["pid"])
            time.sleep(0.1)
        assert len(pids) == 2, pids
        png = sample_png.read_bytes()

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[
                    client.post(f"{server.url}/v1/images/edits", files={"image": ("in.png", png, "image/png")},
                                data={"prompt": "add a moon", "steps": "2", "auto_resize": "false", "seed": str(s)})
                    for s in range(4)])

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), dtype=int)
                  for r in responses]
        assert all(np.abs(images[i] - images[j]).max() > 0 for i in range(4) for j in range(i + 1, 4))
        bad = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": ""}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

        # Each replica holds max batch (4) + --max-queue (1) requests: a burst of 16 overflows both.
        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[
                    client.post(f"{server.url}/v1/images/generations",
                                json={"prompt": "a red house", "size": "256x256", "steps": 8, "seed": s})
                    for s in range(16)])

        flooded = asyncio.run(flood())
        codes = sorted(r.status_code for r in flooded)
        assert set(codes) == {200, 429} and codes.count(200) <= 10, codes
        refused = next(r for r in flooded if r.status_code == 429)
        assert refused.headers["content-type"] == "application/json" and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "queue_full"

        async def term_mid_flight():  # a 512x512 edit takes seconds here (its VAE decode alone ~3 s)
            async with httpx.AsyncClient(timeout=120) as client:
                flight = asyncio.ensure_future(client.post(f"{server.url}/v1/images/generations",
                                                           json={"prompt": "x", "size": "512x512", "steps": 4}))
                await asyncio.sleep(1.0)
                server.proc.send_signal(15)
                return await flight

        drained = asyncio.run(term_mid_flight())
        assert drained.status_code == 200, drained.text[:300]
        assert server.proc.wait(90) == 0
    finally:
        code = server.stop(timeout_s=60)
    assert code == 0
    print(f"ray test: {time.monotonic() - start:.1f}s")
