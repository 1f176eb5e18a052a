"""`kontext-trt bench serve`: a bounded load generator against a server on this machine (loopback only), results in
`bench run`'s format: one run per concurrency, client latency percentiles, throughput, server stage times."""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import logging
import socket
import time
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import urlparse

import httpx
import numpy as np
import torch
from PIL import Image

from kontext_trt.benchmarks.harness import PROMPT, summarize
from kontext_trt.benchmarks.report import SCHEMA_VERSION
from kontext_trt.benchmarks.system import system_info
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, family_named

log = logging.getLogger(__name__)


def check_loopback(url: str) -> None:
    """Refuse any server but this machine's: the load generator never loads someone else's service."""
    host = urlparse(url).hostname
    if not host:
        raise KontextError(f"--url {url} has no host: write it like http://127.0.0.1:8000")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise KontextError(f"--url {url}: {host} does not resolve: use http://127.0.0.1:PORT") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise KontextError(f"--url {url} is not on this machine: bench serve loads loopback servers only "
                           "(127.0.0.1, ::1, localhost); run it on the server's host")


def server_timing(header: str | None) -> dict[str, float]:
    """'queue;dur=1.5, transformer;dur=20.1' -> {'queue': 1.5, 'transformer': 20.1} (milliseconds)."""
    timings = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            timings[name] = float(rest)
    return timings


async def fire(client: httpx.AsyncClient, url: str, png: bytes, fields: dict) -> dict:
    """One edit: its status, client latency (s), server timings (ms), server batch size and metadata."""
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/images/edits", data=fields,
                                     files={"image": ("bench.png", png, "image/png")})
    except httpx.HTTPError as exc:
        return {"status": exc.__class__.__name__, "seconds": time.perf_counter() - start}
    out = {"status": response.status_code, "seconds": time.perf_counter() - start,
           "timings": server_timing(response.headers.get("server-timing")),
           "batch": int(response.headers.get("x-batch-size", 1))}
    if response.status_code == 200:
        png_out = base64.b64decode(response.json()["data"][0]["b64_json"])
        out["metadata"] = json.loads(Image.open(io.BytesIO(png_out)).text["kontext-trt"])
    return out


async def level(url: str, pngs: list[bytes], fields: dict, concurrency: int, requests: int,
                max_seconds: float, first: int = 0) -> tuple:
    """`requests` edits from `concurrency` workers, each of its own image, prompt and seed (so no server cache
    answers for it); none starts after max_seconds. (replies, wall seconds)."""
    replies: list[dict] = []
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            i = first + issued
            issued += 1
            own = {**fields, "seed": str(i), "prompt": f"{fields['prompt']} ({i})"}
            replies.append(await fire(client, url, pngs[i % len(pngs)], own))

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=max(60.0, max_seconds), limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    return replies, time.perf_counter() - start


def calls(stage: str, steps: int, batch: int) -> int:
    """Calls of a stage in a server batch of `batch` one-image requests: the transformer once per step, the text
    encoders and the VAE encoder once per request, the VAE decoder once."""
    return {"transformer": steps, "vae_decoder": 1}.get(stage, batch)


def run_entry(replies: list[dict], wall: float, warm: list[dict], concurrency: int, width: int, height: int) -> dict:
    """One run of `bench run`'s schema, plus `load`: concurrency, outcomes, throughput, server batch sizes; its steps
    those the server ran (its images' metadata: the request's, or the model's default when none was sent)."""
    ok = [r for r in replies if r["status"] == 200]
    if not ok:
        statuses = Counter(str(r["status"]) for r in replies)
        raise KontextError(f"no edit succeeded at concurrency {concurrency} (statuses {dict(statuses)}): check the "
                           "server's log")
    steps = ok[0]["metadata"]["steps"]
    # the stages of the server's model family (its images' metadata; a server from before it was recorded: FLUX.1)
    stages = family_named(ok[0]["metadata"].get("family", FLUX1_KONTEXT.name)).stage_names
    stages_ms = {}
    for stage in stages:
        per_call = [r["timings"][stage] / calls(stage, steps, r["batch"]) for r in ok if stage in r["timings"]]
        stages_ms[stage] = summarize([ms / 1e3 for ms in per_call] or [0.0])  # 0: every call answered from a cache
    e2e = summarize([r["seconds"] for r in ok])
    breakdown = {name: float(np.mean([r["timings"].get(name, 0.0) for r in ok])) for name in ("queue", *stages)}
    breakdown["other"] = max(0.0, e2e["mean"] - sum(breakdown.values()))
    tokens = (width // 16) * (height // 16)
    return {
        "width": width, "height": height, "batch": 1, "steps": steps, "cuda_graphs": False,
        "tokens": {"target": tokens, "context": tokens, "text": ok[0]["metadata"]["text_length"]},
        "warmup": {"iters": len(warm), "e2e_ms": [1e3 * r["seconds"] for r in warm]},
        "iters": len(ok), "e2e_ms": e2e, "images_per_s": len(ok) / wall, "stages_ms": stages_ms,
        "breakdown_ms": breakdown, "roofline": None,
        "memory": {"device_peak_allocated_bytes": None, "device_peak_reserved_bytes": None, "device_used_bytes": None,
                   "host_peak_rss_bytes": None, "stages": {}},
        "load": {"concurrency": concurrency, "requests": len(replies),
                 "statuses": dict(Counter(str(r["status"]) for r in replies)), "wall_s": wall,
                 "requests_per_s": len(ok) / wall, "mean_server_batch": float(np.mean([r["batch"] for r in ok]))},
    }


def sample_png(width: int, height: int, seed: int) -> bytes:
    """A drawn scene as PNG bytes, different for each seed."""
    buffer = io.BytesIO()
    im.sample_image(width, height, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def run_load(url: str, concurrencies: list[int], requests: int, warmup: int, width: int, height: int,
             steps: int | None = None, prompt: str = PROMPT, max_seconds: float = 600.0) -> dict:
    """Warm the server, then each concurrency level in turn; the results dict (`bench run`'s schema). steps None
    sends none: the server runs its model's default."""
    check_loopback(url)
    url = url.rstrip("/")
    try:
        health = httpx.get(f"{url}/healthz", timeout=10)
    except httpx.HTTPError as exc:
        raise KontextError(f"no server answers at {url} ({exc.__class__.__name__}): start `kontext-trt serve` "
                           "first") from None
    if health.status_code != 200:
        raise KontextError(f"the server at {url} is not ready (healthz {health.status_code}): wait for it to load")
    pngs = [sample_png(width, height, seed) for seed in range(warmup + requests * len(concurrencies))]
    fields = {"prompt": prompt, "auto_resize": "false", "size": f"{width}x{height}",
              **({} if steps is None else {"steps": str(steps)})}
    system = system_info(torch.device("cpu"))  # loopback: the server's machine
    warm, _ = asyncio.run(level(url, pngs, fields, 1, warmup, max_seconds)) if warmup else ([], 0.0)
    runs = []
    for n, concurrency in enumerate(concurrencies):
        log.info("concurrency %d: %d requests", concurrency, requests)
        first = warmup + n * requests
        replies, wall = asyncio.run(level(url, pngs, fields, concurrency, requests, max_seconds, first))
        runs.append(run_entry(replies, wall, warm, concurrency, width, height))
        print(f"concurrency {concurrency}: {runs[-1]['load']['requests_per_s']:.2f} req/s, p50 "
              f"{runs[-1]['e2e_ms']['p50']:.0f} ms, p99 {runs[-1]['e2e_ms']['p99']:.0f} ms", flush=True)
    meta = next(r["metadata"] for r in replies if r["status"] == 200)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "system": system,
        "target": {"backend": meta.get("backend") or "unknown", "model": None, "checkpoint": meta.get("checkpoint"),
                   "onnx": None, "engines": meta.get("engines"), "dtype": meta.get("dtype") or "unknown",
                   "precision": meta.get("precision") or meta.get("dtype") or "unknown", "device": f"server {url}",
                   "transformer_config": None},
        "settings": {"warmup": warmup, "iters": requests},
        "engine_sizes_bytes": None,
        "runs": runs,
    }
