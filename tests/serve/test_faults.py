"""Faults: a request that fails at run time is answered 500 while its batch-mates and the server live on; SIGTERM
drains in-flight requests and the server exits 0. (The timed back-pressure tests are in test_back_pressure.py.)"""
from __future__ import annotations

import asyncio

import httpx
from conftest import FaultyTransformer, app_in_thread, post, server_process


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
