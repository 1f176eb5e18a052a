"""Servers for the serve tests, all on 127.0.0.1 and a free port: `kontext-trt serve` as a subprocess, or the app in a
thread over a pipeline with fake stages (slow or failing) for the timing and fault paths. Every wait is bounded."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

STARTUP_S = 180  # a loaded 2-core CI machine loads and warms the tiny model in well under this


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = STARTUP_S) -> None:
    """Poll /healthz until 200 (bounded); fail with the server's output if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} was not healthy after {timeout_s}s")


class ServerProcess:
    """`kontext-trt serve ...` on a free loopback port."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kontext_trt.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait (bounded); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@contextmanager
def server_process(*args: str, env: dict | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(*args, env=env)
    try:
        wait_healthy(server.url, server.proc)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def served(tiny_ckpt) -> Iterator[ServerProcess]:
    """One server for the API tests: tiny fp32 model, batches of up to 4 within 500 ms."""
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--max-batch", "4",
                        "--batch-window-ms", "500") as server:
        yield server


EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false"}


async def post(client: httpx.AsyncClient, url: str, png: bytes, delay_s: float = 0.0, **fields) -> httpx.Response:
    """POST an edit of `png` (EDIT's fields, overridden by `fields`) after `delay_s`."""
    await asyncio.sleep(delay_s)
    return await client.post(f"{url}/v1/images/edits", data={**EDIT, **fields},
                             files={"image": ("in.png", png, "image/png")})


class SlowStage:
    """A stage that sleeps before each call: batches that take a known time."""

    def __init__(self, stage, seconds: float) -> None:
        self.stage, self.seconds = stage, seconds

    def __call__(self, **inputs):
        time.sleep(self.seconds)
        return self.stage(**inputs)


class FaultyTransformer:
    """A transformer that fails whenever a batch item asks for guidance 13: a request that breaks at run time."""

    def __init__(self, stage) -> None:
        self.stage = stage

    def __call__(self, **inputs):
        if (inputs["guidance"] == 13).any():
            raise RuntimeError("injected fault")
        return self.stage(**inputs)


@pytest.fixture(scope="package")
def tiny_pipeline(tiny_ckpt):
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core.specs import LoadSpec

    return build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))


@contextmanager
def app_in_thread(k, wrap: dict, max_batch: int = 4, max_queue: int = 64, window_s: float = 0.005,
                  timeout_s: float = 300, policy=None, cache: str = "off") -> Iterator[str]:
    """The app over pipeline k with stages replaced by wrap[name](stage), served by uvicorn in a thread; its URL.
    `policy`: the service's safety OutputPolicy (default: NudeNet and the watermark); `cache`: serve --cache."""
    import asyncio

    import uvicorn

    from kontext_trt.core.specs import parse_cache
    from kontext_trt.serve.app import Settings, create_app
    from kontext_trt.serve.batcher import MicroBatcher
    from kontext_trt.serve.metrics import Metrics
    from kontext_trt.serve.service import EditService

    faked = k.with_stages(**{name: make(k.stages[name]) for name, make in wrap.items()})
    service = EditService(lambda: faked, policy=policy)
    metrics = Metrics()
    batcher = MicroBatcher(service, metrics, max_batch, max_queue, window_s)

    async def lifespan(app):
        batcher.start()
        await asyncio.get_running_loop().run_in_executor(batcher.model_thread, service.load)
        yield
        await batcher.stop()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(batcher, metrics, Settings(timeout_s, parse_cache(cache)), lifespan),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=120)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def sample_png(tmp_path) -> Path:
    from kontext_trt.core import image as im
    path = tmp_path / "in.png"
    im.sample_image(96, 64).save(path)
    return path


@pytest.fixture
def app_server():
    """app_in_thread, for test modules (they cannot import this conftest)."""
    return app_in_thread
