"""Micro-batching: requests that share a batch key and arrive within a short window run as one batch, on the model
thread; their safety steps and encoding run on a worker pool, so the model thread runs nothing but the model."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from kontext_trt.core.errors import Cancelled
from kontext_trt.runtime.flow import EditRequest, EditResult
from kontext_trt.serve.metrics import Metrics
from kontext_trt.serve.service import BatchRun, EditService, Served, serve_request

log = logging.getLogger(__name__)
# Input checks, output checks, watermarks and PNG encodes of requests in flight: a few threads, no more than cores.
POOL_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4))
POOL_NICE = 10  # the pool's threads yield the CPU to the model thread (whose host work feeds the GPU)


def worker_pool(threads: int = POOL_THREADS) -> ThreadPoolExecutor:
    """The worker pool: `threads` threads at a lower CPU priority than the model thread (nice +10, where the OS
    sets it per thread), so post-processing never delays the next batch's launch."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kontext-pool", initializer=lower_priority)


def lower_priority() -> None:
    """Lower the calling thread's CPU priority by POOL_NICE (Linux: per thread; elsewhere, nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + POOL_NICE)
    except (AttributeError, OSError):
        pass


class QueueFull(Exception):
    """The queue holds --max-queue requests already; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server's queue is full: retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Job:
    """A queued request and the future its handler awaits."""

    req: EditRequest
    key: tuple
    future: asyncio.Future
    images: int
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """One worker task: takes the oldest request, waits up to `window_s` for requests of its key (up to `max_batch`
    images), runs them on the model thread, hands each request its own outcome. A request whose handler gave up
    (timeout, disconnect) is dropped from the queue; if its batch already runs, the batch stops between steps once
    all its requests gave up, else runs on for the others and the result is discarded."""

    def __init__(self, service: EditService, metrics: Metrics, max_batch: int = 4, max_queue: int = 64,
                 window_s: float = 0.005, pool_threads: int = POOL_THREADS) -> None:
        self.service, self.metrics = service, metrics
        self.max_batch, self.max_queue, self.window_s = max_batch, max_queue, window_s
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kontext-model")
        self.pool = worker_pool(pool_threads)
        self.worker: asyncio.Task | None = None
        self.batch_seconds = 1.0  # a running estimate, for Retry-After

    def signer(self, result: EditResult) -> Callable[[bytes, str], bytes] | None:
        """Runner.signer: the service's C2PA signing."""
        return self.service.signer(result)

    def start(self) -> None:
        """Start the worker task on the running loop."""
        self.worker = asyncio.get_running_loop().create_task(self.work())

    async def stop(self) -> None:
        """Stop the worker (after in-flight requests were drained) and the model thread."""
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.model_thread.shutdown(wait=True)
        self.pool.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        """Loaded and warmed."""
        return self.service.ready

    async def submit(self, req: EditRequest) -> Served:
        """Queue a request and wait for its result, its safety steps on the pool around it; QueueFull when the queue
        is full."""
        self.check_room()
        return await serve_request(self.service, self.pool, req, self.enqueue, self.metrics)

    def check_room(self) -> None:
        """QueueFull when --max-queue requests wait already."""
        self.purge()
        if len(self.queue) >= self.max_queue:
            raise QueueFull(max(1, round(self.batch_seconds * (1 + len(self.queue) / self.max_batch))))

    async def enqueue(self, req: EditRequest) -> Served:
        """Queue an admitted request (checked again: others were admitted meanwhile) and await its model result."""
        self.check_room()
        job = Job(req, self.service.batch_key(req), asyncio.get_running_loop().create_future(), len(req.prompts))
        self.queue.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        self.arrived.set()
        return await job.future

    def purge(self) -> None:
        """Drop requests whose handler gave up."""
        if any(job.future.done() for job in self.queue):
            self.queue = deque(job for job in self.queue if not job.future.done())
            self.metrics.queue_depth.set(len(self.queue))

    def queued_images(self, key: tuple) -> int:
        """Images queued under `key`."""
        return sum(job.images for job in self.queue if job.key == key and not job.future.done())

    def take(self, key: tuple) -> list[Job]:
        """Remove and return the oldest live jobs of `key`, up to max_batch images (the first always goes)."""
        batch, images, rest = [], 0, deque()
        for job in self.queue:
            if job.future.done():
                continue
            if job.key == key and (not batch or images + job.images <= self.max_batch):
                batch.append(job)
                images += job.images
            else:
                rest.append(job)
        self.queue = rest
        self.metrics.queue_depth.set(len(self.queue))
        return batch

    async def work(self) -> None:
        """The worker loop: gather a batch, run it off the event loop, deliver outcomes."""
        loop = asyncio.get_running_loop()
        while True:
            self.purge()
            if not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            first = self.queue[0]
            close = first.enqueued + self.window_s
            while self.queued_images(first.key) < self.max_batch and time.perf_counter() < close:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), close - time.perf_counter())
                except TimeoutError:
                    break
            batch = self.take(first.key)
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                self.metrics.stage_latency.labels("queue").observe(started - job.enqueued)
            try:
                run = await loop.run_in_executor(self.model_thread, self.service.run, [job.req for job in batch])
            except Exception as exc:  # noqa: BLE001 - the worker outlives any batch
                log.exception("a batch of %d failed outside the model", len(batch))
                run = BatchRun([exc] * len(batch))
            if all(isinstance(outcome, Cancelled) for outcome in run.outcomes):
                self.metrics.cancelled.inc()
            else:
                self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * run.seconds
            self.metrics.observe_batch(sum(job.images for job in batch), run)
            images = sum(job.images for job in batch)
            for job, outcome in zip(batch, run.outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(Served(outcome, images, started - job.enqueued, run.stage_seconds))
