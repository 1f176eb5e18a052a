"""The model behind the server: one pipeline, the session's prompt and input-latent caches, batches and warm-up.

Work is split by thread: `run` (the model thread) runs nothing but the model; `admit` (the input safety check) and
`finish` (the output check and watermark) run on a worker pool, around it (`serve_request`)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from kontext_trt.core import image as im
from kontext_trt.core.errors import Cancelled, KontextError
from kontext_trt.core.specs import parse_lora
from kontext_trt.core.timing import StageTimes
from kontext_trt.runtime import flow
from kontext_trt.runtime.flow import EditRequest, EditResult, Kontext
from kontext_trt.runtime.session import EditSession
from kontext_trt.safety import guard
from kontext_trt.safety.checker import ContentFlagged, Verdict
from kontext_trt.serve.openai_api import field_names

if TYPE_CHECKING:
    from kontext_trt.serve.metrics import Metrics

log = logging.getLogger(__name__)


def small_edit(k: Kontext) -> EditRequest:
    """The warm-up request of the torch and ONNX Runtime backends: one step on a 64x64 image."""
    return EditRequest(prompts=["warm up"], image=im.sample_image(64, 64), steps=1, auto_resize=False)


def lora_set(lora_dir: Path | None, text: str) -> list[tuple[Path, float]]:
    """A request's `lora` value, NAME[:SCALE],..., as (file or folder in lora_dir, scale) pairs."""
    if lora_dir is None:
        raise KontextError("lora: this server has no LoRAs: start it with --lora-dir DIR to serve named LoRAs",
                           "lora", "unsupported_parameter")
    loras = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, scale = parse_lora(item)
        if name.name != str(name) or name.name.startswith("."):
            raise KontextError(f"lora: {str(name)!r} is not a LoRA name: use a name of {available(lora_dir)}",
                               "lora", "invalid_value")
        path = next((p for p in (lora_dir / f"{name}.safetensors", lora_dir / str(name)) if p.exists()), None)
        if path is None:
            raise KontextError(f"lora: no LoRA named {str(name)!r}: this server has {available(lora_dir)}",
                               "lora", "not_found")
        loras.append((path, scale))
    return loras


def available(lora_dir: Path) -> str:
    """The LoRA names of a --lora-dir, for error messages."""
    names = sorted(p.stem if p.is_file() else p.name for p in lora_dir.iterdir()
                   if (p.is_file() and p.suffix == ".safetensors") or p.is_dir())
    return ", ".join(names) or "none"


@dataclass
class Served:
    """A request's result and how it was served: its batch's size, its wait in the queue, the batch's stage seconds."""

    result: EditResult
    batch_images: int
    queue_s: float
    stage_seconds: dict[str, float]

    def server_timing(self) -> str:
        """A Server-Timing header value (milliseconds), which browsers' devtools and the page show."""
        parts = [f"queue;dur={1e3 * self.queue_s:.1f}"]
        parts += [f"{stage};dur={1e3 * seconds:.1f}" for stage, seconds in self.stage_seconds.items()]
        return ", ".join(parts)


@dataclass
class BatchRun:
    """What one batch returned: a result or an exception per request, its stage seconds and wall time."""

    outcomes: list[EditResult | BaseException]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    lora_swaps: int = 0


class EditService:
    """Loads the pipeline once, then runs batches of requests (`run`: one at a time, from one thread, the model
    thread); `admit` and `finish`, the safety steps around a request, may run on any thread."""

    def __init__(self, load: Callable[[], Kontext], warm_request: Callable[[Kontext], EditRequest] = small_edit,
                 cache_size: int = 64, policy: guard.OutputPolicy | None = None, lora_dir: Path | None = None,
                 default_loras: list[tuple[Path, float]] = (), max_steps: int | None = None) -> None:
        self.load_pipeline, self.warm_request, self.cache_size = load, warm_request, cache_size
        self.max_steps = max_steps  # serve --max-steps: a request that sends no steps runs the model's, at most this
        self.lora_dir, self.default_loras = lora_dir, list(default_loras)  # the --lora set serves requests without one
        self.lora: str | None = None  # the request `lora` whose set the transformer holds now (None: the default)
        self.policy = policy  # None: the default (NudeNet on the pipeline's device, watermark), made at load
        self.checking = threading.Lock()  # one checker call at a time: a checker need not be thread-safe
        self.k: Kontext | None = None
        self.session: EditSession | None = None
        self.ready = False

    def load(self) -> None:
        """Load the pipeline and run one edit, safety steps included, so the first request pays no first-call costs;
        then ready."""
        start = time.perf_counter()
        self.k = self.load_pipeline()
        if self.policy is None:
            self.policy = guard.OutputPolicy.from_options(device=self.k.device)
        self.session = EditSession(self.k, cache_size=self.cache_size)
        warm = self.warm_request(self.k)
        verdict = self.admit(warm, StageTimes())
        done = self.run([warm]).outcomes[0]
        if isinstance(done, BaseException):
            raise done
        self.finish(warm, done, verdict, StageTimes())
        self.ready = True
        log.info("model loaded and warmed in %.2fs (%s)", time.perf_counter() - start, self.k.info)

    def with_defaults(self, req: EditRequest) -> EditRequest:
        """flow.with_defaults on the loaded pipeline; a request that sent no steps runs the model's default
        (flow.default_steps), at most max_steps."""
        if req.steps is None and self.max_steps is not None:
            req = replace(req, steps=min(flow.default_steps(self.k), self.max_steps))
        return flow.with_defaults(self.k, req)

    def admit(self, req: EditRequest, times: StageTimes) -> Verdict | None:
        """The family's checks (KontextError) and the input safety check of a request, before it is queued (any
        thread): its verdict (None: no image or no checker), or ContentFlagged, and then the request reaches no
        stage."""
        try:  # what this model family refuses, before queueing, in the API's field names
            self.k.ops.check(self.k, self.with_defaults(req))
        except KontextError as exc:
            raise KontextError(field_names(exc.message), exc.param, exc.code) from None
        with self.checking:
            [verdict] = guard.input_verdicts(self.policy, [req], times)
        if verdict is not None and verdict.flagged:
            raise ContentFlagged("input image", [verdict])
        return verdict

    def finish(self, req: EditRequest, result: EditResult, verdict: Verdict | None, times: StageTimes) -> EditResult:
        """guard.finish (any thread): the decoded pixels made images, every output checked, watermarked, verdicts in
        the metadata; ContentFlagged if an output is flagged."""
        result = flow.with_images(result)
        with self.checking:
            verdicts = guard.check(self.policy, result.images, times)
        return guard.finish_checked(self.policy, req, result, times, verdict, verdicts)

    def batch_key(self, req: EditRequest) -> tuple:
        """flow.batch_key on the loaded pipeline: requests of equal keys may run as one batch."""
        return flow.batch_key(self.k, req)

    def run(self, reqs: list[EditRequest]) -> BatchRun:
        """Run requests sharing a batch key as one batch (the model thread); should the batch fail, each request
        runs alone so one bad request cannot fail its batch-mates. A batch whose requests were all cancelled stops
        between steps: Cancelled for each."""
        start = time.perf_counter()
        self.k.reset_times()
        try:
            swaps = self.use_loras(reqs[0].lora)  # one LoRA set per batch: it is part of the batch key
        except Exception as exc:  # noqa: BLE001 - a bad LoRA name fails its batch, the server and its set stay
            return BatchRun([exc] * len(reqs), {}, time.perf_counter() - start)
        try:
            outcomes = self.run_batch(reqs)
        except Cancelled as exc:
            outcomes = [exc] * len(reqs)
        except Exception as exc:  # noqa: BLE001 - an outcome per request, never a dead server
            if len(reqs) == 1:
                outcomes = [exc]
            else:
                log.warning("a batch of %d failed (%s); running its requests one by one", len(reqs), exc)
                outcomes = [self.run_alone(req) for req in reqs]
        return BatchRun(outcomes, self.k.times.totals(), time.perf_counter() - start, swaps)

    def use_loras(self, lora: str | None) -> int:
        """Put the transformer on a request's LoRA set (NAME[:SCALE],... of --lora-dir; None: the --lora set);
        returns 1 if that took a swap."""
        if lora == self.lora:
            return 0
        self.k.set_loras(self.default_loras if lora is None else lora_set(self.lora_dir, lora))
        self.lora = lora
        return 1

    def run_alone(self, req: EditRequest) -> EditResult | BaseException:
        """One request, its failure returned rather than raised."""
        try:
            return self.run_batch([req])[0]
        except Exception as exc:  # noqa: BLE001
            return exc

    def signer(self, result: EditResult) -> Callable[[bytes, str], bytes] | None:
        """What signs a result's PNGs with the policy's C2PA credentials (None without them); called off the model
        thread, so its time is not in the batch's stage table."""
        return guard.signer(self.policy, result, StageTimes())

    def run_batch(self, reqs: list[EditRequest]) -> list[EditResult]:
        """flow.edit_batch through the session's caches (prompt encodings and input latents): model work only, its
        pixels left for `finish` to make images of."""
        prompts = [self.session.prompt(req.prompts) for req in reqs]
        contexts = [None if req.image is None else self.session.context(req.images, req.auto_resize) for req in reqs]
        return flow.edit_batch(self.k, reqs, prompts, contexts, to_images=False)


async def serve_request(service: EditService, pool: Executor, req: EditRequest,
                        run: Callable[[EditRequest], Awaitable[Served]], metrics: Metrics | None = None) -> Served:
    """One request through a runner (`run`: queue, batch, model thread), its safety steps on `pool` around it. The
    request gets a cancel event, set if the caller gives up (timeout, disconnect: this coroutine is cancelled), so
    its batch stops between steps once every request in it was cancelled. What the request left to the model (steps,
    guidance) is filled in first, so its batch key, result and metadata carry the values run."""
    loop = asyncio.get_running_loop()
    req = service.with_defaults(req)
    req.cancel = req.cancel or threading.Event()
    times = StageTimes()
    try:
        verdict = await loop.run_in_executor(pool, service.admit, req, times)
        served = await run(req)
        result = await loop.run_in_executor(pool, service.finish, req, served.result, verdict, times)
    except asyncio.CancelledError:
        req.cancel.set()
        raise
    safety = times.totals()
    if metrics is not None:
        for stage, seconds in safety.items():
            metrics.stage_latency.labels(stage).observe(seconds)
    return replace(served, result=result, stage_seconds={**served.stage_seconds, **safety})
