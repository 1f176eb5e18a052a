"""The same FastAPI app as a Ray Serve deployment: one replica per GPU (CPU replicas where there is none), batching
with @serve.batch, on a local Ray or an existing cluster (--address). Each replica counts its requests in flight and
answers 429 (OpenAI's shape, Retry-After) past --max-queue, before Ray's own queue limit; SIGTERM drains in-flight
requests (up to --drain-timeout) before Serve shuts down."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ray import serve
from ray.serve.config import BackpressureConfig

from kontext_trt.core.errors import Cancelled
from kontext_trt.runtime.flow import EditRequest, EditResult
from kontext_trt.serve.app import create_app
from kontext_trt.serve.batcher import QueueFull, worker_pool
from kontext_trt.serve.metrics import Metrics
from kontext_trt.serve.server import ServeConfig
from kontext_trt.serve.service import Served, serve_request
from kontext_trt.serve.slow import ReadDeadline

log = logging.getLogger(__name__)
APP_NAME = "kontext"


@serve.deployment
@serve.ingress()
class KontextDeployment:
    """One replica: the model loaded and warmed in __init__ (Ray routes to it once that returns), the app built
    per replica, requests gathered by @serve.batch and split by batch key, safety steps and encoding on a pool."""

    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, Metrics()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kontext-model")
        self.pool = worker_pool()
        self.in_flight, self.batch_seconds = 0, 1.0
        self.service = config.service()
        self.model_thread.submit(self.service.load).result()
        self.max_batch = config.batch_size(self.service.k)
        self.batched.set_max_batch_size(self.max_batch)
        self.batched.set_batch_wait_timeout_s(config.batch_window_ms / 1e3)

    @property
    def ready(self) -> bool:
        return self.service.ready

    def __serve_build_asgi_app__(self):
        return ReadDeadline(create_app(self, self.metrics, self.config.settings()), self.config.read_timeout)

    def signer(self, result: EditResult) -> Callable[[bytes, str], bytes] | None:
        """Runner.signer: the service's C2PA signing."""
        return self.service.signer(result)

    async def submit(self, req: EditRequest) -> Served:
        """Runner.submit: one request through @serve.batch, its safety steps on the pool around it; QueueFull past
        max_batch running and --max-queue waiting."""
        if self.in_flight >= self.max_batch + self.config.max_queue:
            waiting = self.in_flight - self.max_batch
            raise QueueFull(max(1, round(self.batch_seconds * (1 + waiting / self.max_batch))))
        self.in_flight += 1
        try:
            return await serve_request(self.service, self.pool, req, self.through_batch, self.metrics)
        finally:
            self.in_flight -= 1

    async def through_batch(self, req: EditRequest) -> Served:
        """One admitted request through @serve.batch."""
        enqueued = time.perf_counter()
        outcome = await self.batched(req, enqueued)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def batched(self, reqs: list[EditRequest], enqueued: list[float]) -> list[Served | BaseException]:
        """Ray's batch split into groups of one batch key (up to max_batch images), each run as one batch; a group
        whose requests were all cancelled is skipped (or stops between steps if it runs)."""
        loop = asyncio.get_running_loop()
        outcomes: list[Served | BaseException | None] = [None] * len(reqs)
        for group in key_groups(reqs, self.max_batch, self.service.batch_key):
            if all(reqs[i].cancel is not None and reqs[i].cancel.is_set() for i in group):
                for i in group:
                    outcomes[i] = Cancelled()
                continue
            started = time.perf_counter()
            run = await loop.run_in_executor(self.model_thread, self.service.run, [reqs[i] for i in group])
            images = sum(len(reqs[i].prompts) for i in group)
            if all(isinstance(outcome, Cancelled) for outcome in run.outcomes):
                self.metrics.cancelled.inc()
            else:
                self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * run.seconds
            self.metrics.observe_batch(images, run)
            for i, outcome in zip(group, run.outcomes):
                outcomes[i] = outcome if isinstance(outcome, BaseException) else Served(
                    outcome, images, started - enqueued[i], run.stage_seconds)
        return outcomes


def key_groups(reqs: list[EditRequest], max_images: int, key: Callable[[EditRequest], tuple]) -> list[list[int]]:
    """Indices of reqs grouped by batch key (`key`: EditService.batch_key), in arrival order, each group at most
    max_images images."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, req in enumerate(reqs):
        chunks = groups.setdefault(key(req), [[]])
        if chunks[-1] and sum(len(reqs[j].prompts) for j in chunks[-1]) + len(req.prompts) > max_images:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]


def deployment_options(config: ServeConfig, gpus_here: bool) -> dict:
    """Replicas (fixed or autoscaled), resources per replica and how many requests each holds."""
    gpus = config.gpus_per_replica if gpus_here else 0
    # Requests reach a replica, which answers 429 JSON itself past max batch + --max-queue in flight; Ray's own
    # limits sit well above that (Ray counts a request as queued while it is being routed, even to an idle replica)
    # and its rejection (429 text with Retry-After) is only the backstop.
    ongoing = 2 * (config.max_batch or 4) + config.max_queue + 8
    options = {"ray_actor_options": {"num_gpus": gpus, "num_cpus": config.cpus_per_replica},
               "max_ongoing_requests": ongoing, "max_queued_requests": 4 * ongoing,
               "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=5),
               "graceful_shutdown_timeout_s": config.drain_timeout, "graceful_shutdown_wait_loop_s": 0.5,
               "health_check_period_s": 10}
    if config.autoscale:
        low, high = config.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": config.max_batch or 4}
    else:
        options["num_replicas"] = config.replicas
    return options


def deployment(config: ServeConfig, gpus_here: bool = True) -> serve.Application:
    """The Ray Serve application of a config (cli/serve.py's app_builder gives it to KubeRay and `serve run`)."""
    return KontextDeployment.options(**deployment_options(config, gpus_here)).bind(config)


def run_ray(config: ServeConfig) -> int:
    """Deploy on Ray Serve, answer on --host/--port until SIGTERM or SIGINT; then drain: the application is deleted
    (replicas take no new requests and finish those in flight, up to --drain-timeout), and Serve shuts down."""
    import ray
    import torch

    ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
    gpus_here = torch.cuda.is_available() or bool(ray.cluster_resources().get("GPU"))
    options = deployment_options(config, gpus_here)
    log.info("deploying %s on Ray Serve: %s", APP_NAME, options)
    serve.start(http_options={"host": config.host, "port": config.port,
                              "keep_alive_timeout_s": max(1, round(config.keep_alive_timeout))})  # whole seconds
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.run(KontextDeployment.options(**options).bind(config), name=APP_NAME, route_prefix="/")
        log.info("ready: serving on http://%s:%d through Ray Serve", config.host, config.port)
        stop.wait()
        log.info("draining: finishing in-flight requests (up to %gs)", config.drain_timeout)
        serve.delete(APP_NAME, _blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
