"""/healthz and edits while the model loads (503, Retry-After), then 200 once loaded and warmed; Ray's batch split."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import uvicorn
from conftest import free_port, wait_healthy

from kontext_trt.core import image as im
from kontext_trt.runtime.flow import EditRequest
from kontext_trt.safety.guard import OutputPolicy
from kontext_trt.serve.app import Settings, create_app
from kontext_trt.serve.batcher import MicroBatcher
from kontext_trt.serve.metrics import Metrics
from kontext_trt.serve.service import EditService


def test_healthz_is_503_until_the_model_is_loaded_and_warmed(tiny_pipeline):
    gate = threading.Event()

    def load():
        gate.wait(60)  # the test decides when loading ends
        return tiny_pipeline

    service = EditService(load, policy=OutputPolicy(None, "none"))
    metrics = Metrics()
    batcher = MicroBatcher(service, metrics)

    async def lifespan(app):
        batcher.start()
        asyncio.get_running_loop().run_in_executor(batcher.model_thread, service.load)
        yield
        gate.set()
        await batcher.stop()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(batcher, metrics, Settings(), lifespan), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/healthz", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1},
                           timeout=10)
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        assert int(early.headers["retry-after"]) >= 1
        gate.set()
        wait_healthy(url, timeout_s=120)
        assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1},
                          timeout=60).status_code == 200
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def test_ray_batches_split_by_key_and_size(tiny_pipeline):
    from kontext_trt.runtime.flow import batch_key
    from kontext_trt.serve.ray_app import key_groups

    def key(req):
        return batch_key(tiny_pipeline, req)

    image = im.sample_image(96, 64)
    reqs = [EditRequest(["a"], image, auto_resize=False), EditRequest(["b"], steps=4, width=64, height=64),
            EditRequest(["c", "c"], image, auto_resize=False), EditRequest(["d"], image, auto_resize=False),
            EditRequest(["e"], image, auto_resize=False)]
    assert key_groups(reqs, 4, key) == [[0, 2, 3], [4], [1]]
    assert key_groups(reqs, 1, key) == [[0], [2], [3], [4], [1]]
