"""Server throughput against a simulated GPU: `python -m kontext_trt.benchmarks.serve_throughput`.

The tiny checkpoint's pipeline with a transformer that sleeps a fixed time per step (time.sleep releases the GIL, as
a wait on a GPU kernel does) and VAE stages that cost next to nothing, served by the real app and micro-batcher on
uvicorn in this process (127.0.0.1), loaded by `concurrency` clients sending 1024x1024 edits. The bound is the
throughput of a server whose model thread does nothing but the sleeping steps: max_batch images per steps x step
time; the figure is the server's throughput over that bound. It lives in serve/, not benchmarks/: it runs the app
in-process, and the floors keep benchmarks/ from importing serve/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import torch

from kontext_trt.core import image as im
from kontext_trt.runtime.flow import Kontext

MODEL_STAGES = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder")


class SleepingTransformer:
    """The simulated GPU: each call sleeps `seconds` and returns a zero velocity of the right shape."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(self.seconds)
        return {"latent": torch.zeros_like(inputs["hidden_states"])}


class CheapEncoder:
    """A VAE encoder of the right output shape that costs next to nothing."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        return {"latent": torch.zeros(b, self.channels, h // 8, w // 8)}


class CheapDecoder:
    """A VAE decoder of the right output shape that returns a fixed photo-like picture (so that PNG encoding and
    the watermark cost what they do on real outputs)."""

    def __init__(self) -> None:
        self.pictures: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = latent.shape
        if (w, h) not in self.pictures:
            self.pictures[w, h] = im.image_to_tensor(im.sample_image(8 * w, 8 * h), 8 * w, 8 * h)
        return {"images": self.pictures[w, h].expand(b, -1, -1, -1).clone()}


def simulated_gpu(k: Kontext, step_s: float) -> Kontext:
    """k with the sleeping transformer and cheap VAE stages (text encoders stay: prompts are cached anyway)."""
    return k.with_stages(transformer=SleepingTransformer(step_s), vae_encoder=CheapEncoder(k.config.latent_channels),
                         vae_decoder=CheapDecoder())


class Recording(ThreadPoolExecutor):
    """A thread pool that records, per callable name, the threads that ran it and the seconds they took."""

    def __init__(self, workers: int, prefix: str, initializer: Callable[[], None] | None = None) -> None:
        super().__init__(max_workers=workers, thread_name_prefix=prefix, initializer=initializer)
        self.threads: dict[str, set[str]] = {}
        self.seconds: Counter = Counter()
        self.lock = threading.Lock()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        name = getattr(fn, "__qualname__", repr(fn))

        def recorded():
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.threads.setdefault(name, set()).add(threading.current_thread().name)
                    self.seconds[name] += time.perf_counter() - start

        return super().submit(recorded)


@dataclass
class Figure:
    """What one run measured: the settings, the throughput and its bound, and where the model thread's time went."""

    size: int
    steps: int
    step_ms: float
    max_batch: int
    concurrency: int
    requests: int
    checker: str
    seconds: float = 0.0  # the measured window: from the end of the batch that completes the warm-up to the end of
    # the batch that completes the measured edits
    client_seconds: float = 0.0  # from the first answer to the last, as the clients saw it
    images_per_s: float = 0.0
    bound_images_per_s: float = 0.0
    ratio: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> batches of that size
    model_thread_busy_s: float = 0.0  # in the window: wall time of EditService.run calls
    model_thread_stage_s: float = 0.0  # of which inside the five model stages
    gaps_ms: list[float] = field(default_factory=list)  # idle time of the model thread between batches in the window
    model_thread_calls: dict[str, list[str]] = field(default_factory=dict)  # callable -> threads that ran it
    pool_calls: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> str:
        """The figure as a few lines of text."""
        other = self.model_thread_busy_s - self.model_thread_stage_s
        return "\n".join([
            f"{self.requests} edits of {self.size}x{self.size}, {self.steps} steps at {self.step_ms:g} ms "
            f"(simulated GPU), concurrency {self.concurrency}, max batch {self.max_batch}, checker {self.checker}",
            f"server throughput   {self.images_per_s:.3f} images/s (batches ending in {self.seconds:.1f} s after "
            f"{self.concurrency} warm-up edits; clients got all answers in {self.client_seconds:.1f} s)",
            f"simulated-GPU bound {self.bound_images_per_s:.3f} images/s ({self.max_batch} images per "
            f"{self.steps} x {self.step_ms:g} ms)",
            f"ratio               {100 * self.ratio:.1f}%",
            f"batch sizes         {dict(sorted(self.batches.items()))} (batches per size)",
            f"model thread        busy {self.model_thread_busy_s:.2f} s of {self.seconds:.2f} s, "
            f"{self.model_thread_stage_s:.2f} s of it in model stages, {other:.2f} s outside them; "
            f"ran {sorted(self.model_thread_calls)}; gaps between batches (ms): "
            f"{', '.join(f'{gap:.0f}' for gap in self.gaps_ms)}",
            f"worker pool         ran {sorted(self.pool_calls)}"])


def measure(k: Kontext, size: int = 1024, steps: int = 28, step_ms: float = 100.0, concurrency: int = 8,
            requests: int = 32, max_batch: int = 4, checker: str = "none") -> Figure:
    """Serve k (its stages made a simulated GPU) on 127.0.0.1 and send `concurrency` warm-up edits, `requests`
    measured ones and `concurrency` more, `concurrency` at a time, from a client process (so that the clients take
    no GIL from the server); the figure, over the batches of the measured edits (steady state: every answer's checks
    and encoding overlap later batches, or would show as gaps between them)."""
    import multiprocessing

    import uvicorn

    from kontext_trt.safety.guard import OutputPolicy
    from kontext_trt.serve.app import Settings, create_app
    from kontext_trt.serve.batcher import POOL_THREADS, MicroBatcher, lower_priority
    from kontext_trt.serve.metrics import Metrics
    from kontext_trt.serve.service import EditService

    fig = Figure(size, steps, step_ms, max_batch, concurrency, requests, checker)
    service = EditService(lambda: simulated_gpu(k, step_ms / 1e3), policy=OutputPolicy.from_options(checker))
    metrics = Metrics()
    batcher = MicroBatcher(service, metrics, max_batch=max_batch, max_queue=4 * concurrency)
    batcher.model_thread.shutdown(), batcher.pool.shutdown()  # the same executors, recording what runs where
    batcher.model_thread = Recording(1, "kontext-model")
    batcher.pool = Recording(POOL_THREADS, "kontext-pool", initializer=lower_priority)
    runs: list[tuple[float, float, float, int]] = []  # (start, end, seconds in model stages, images) per batch
    run = service.run

    def timed_run(reqs):
        start = time.monotonic()
        outcome = run(reqs)
        if service.ready:  # not the load's warm-up edit
            stages = sum(outcome.stage_seconds.get(stage, 0.0) for stage in MODEL_STAGES)
            runs.append((start, time.monotonic(), stages, sum(len(req.prompts) for req in reqs)))
        return outcome

    service.run = timed_run

    async def lifespan(app):
        batcher.start()
        await asyncio.get_running_loop().run_in_executor(batcher.model_thread, service.load)
        yield
        await batcher.stop()

    server = uvicorn.Server(uvicorn.Config(create_app(batcher, metrics, Settings(timeout_s=600), lifespan),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = wait_started(server)
        png = im.png_bytes(im.sample_image(size, size), {})
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as clients:
            # a warm-up round, the measured edits, and a round more so that the last measured batch is full too
            answers = clients.apply(load, (url, png, concurrency, 2 * concurrency + requests, steps))
    finally:
        server.should_exit = True
        thread.join(60)
    runs.sort()
    done = [sum(images for *_, images in runs[:i + 1]) for i in range(len(runs))]
    warm = next(i for i, count in enumerate(done) if count >= concurrency)  # the batch that ends the warm-up
    last = next(i for i, count in enumerate(done) if count >= concurrency + requests)  # then `requests` images
    measured = runs[warm + 1:last + 1]
    fig.seconds, fig.client_seconds = runs[last][1] - runs[warm][1], answers[-1] - answers[0]
    fig.batches = dict(Counter(images for *_, images in measured))
    fig.images_per_s = (done[last] - done[warm]) / fig.seconds
    fig.bound_images_per_s = max_batch / (steps * step_ms / 1e3)
    fig.ratio = fig.images_per_s / fig.bound_images_per_s
    fig.gaps_ms = [1e3 * (b[0] - a[1]) for a, b in zip(runs[warm:last], measured)]
    for start, stop, stages, _ in measured:
        fig.model_thread_busy_s += stop - start
        fig.model_thread_stage_s += stages
    fig.model_thread_calls = {name: sorted(t) for name, t in batcher.model_thread.threads.items()}
    fig.pool_calls = {name: sorted(t) for name, t in batcher.pool.threads.items()}
    return fig


def wait_started(server, timeout_s: float = 300) -> str:
    """The URL of an in-process uvicorn server once its app is loaded and warmed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.started:
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready within {timeout_s:g}s")


def load(url: str, png: bytes, concurrency: int, requests: int, steps: int) -> list[float]:
    """`requests` edits from `concurrency` clients, each sending its next as soon as its last is answered (run in
    the client process); when each was answered (time.monotonic(), in order)."""
    left, answers = iter(range(requests)), []

    async def client(http: httpx.AsyncClient) -> None:
        for i in left:
            response = await http.post(f"{url}/v1/images/edits", files={"image": ("in.png", png, "image/png")},
                                       data={"prompt": "add a moon", "steps": str(steps), "seed": str(i)})
            if response.status_code != 200:
                raise RuntimeError(f"edit {i} answered {response.status_code}: {response.text[:300]}")
            answers.append(time.monotonic())

    async def clients() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            await asyncio.gather(*[client(http) for _ in range(concurrency)])

    asyncio.run(clients())
    return answers


def main(argv: list[str] | None = None) -> int:
    """python -m kontext_trt.benchmarks.serve_throughput [--model DIR] [--step-ms MS] ...: print the figure (and
    --json it)."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.synth import write_synthetic_checkpoint

    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.serve_throughput",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint whose text encoders run (default: a tiny synthetic one)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--step-ms", type=float, default=100.0, help="the simulated GPU's time per transformer call")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--safety-checker", default="none", help="nudenet or none (the watermark is always on)")
    p.add_argument("--json", type=Path, help="also write the figure here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_synthetic_checkpoint(Path(tmp) / "tiny")
        k = build_pipeline(LoadSpec(model, dtype="fp32"))
        fig = measure(k, args.size, args.steps, args.step_ms, args.concurrency, args.requests, args.max_batch,
                      args.safety_checker)
    print(fig.lines())
    if args.json:
        args.json.write_text(json.dumps(asdict(fig), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
