"""What a server runs, as one typed value (ServeConfig, parsed from the CLI's flags by cli/serve.py), and the
single-process server: uvicorn, the micro-batcher, the model on one thread; SIGTERM drains, then exits 0."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec, SafetySpec

if TYPE_CHECKING:  # the CLI reads this module to build its parser: torch and the pipeline load on first use
    from kontext_trt.runtime.flow import EditRequest, Kontext
    from kontext_trt.serve.app import Settings
    from kontext_trt.serve.service import EditService

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class ServeConfig:
    """Everything `kontext-trt serve` decided before starting: what to load, what leaves, how requests queue, who
    may call and how much one request may ask, and (--ray) how replicas scale."""

    load: LoadSpec
    safety: SafetySpec = field(default_factory=SafetySpec)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # None: the engine profile's largest batch with engines, else DEFAULT_MAX_BATCH
    max_queue: int = 64
    batch_window_ms: float = 5.0
    timeout: float = 300.0
    drain_timeout: float = 30.0
    read_timeout: float = 60.0  # seconds a request's headers, and then its body, may take to arrive (else 408)
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    log_level: str = "info"
    lora_dir: Path | None = None
    replicas: int = 1  # Ray: fixed replicas, unless autoscale
    autoscale: tuple[int, int] | None = None
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    address: str | None = None
    api_key: str | None = field(default=None, repr=False)  # None: no key asked
    allowed_hosts: tuple[str, ...] | None = None  # None: loopback names when host is loopback, else any Host
    cors_origins: tuple[str, ...] = ()
    max_steps: int = 100
    max_pixels: int = 4096 * 4096
    max_upload_mib: int = 32
    max_prompt_bytes: int = 4096

    def host_names(self) -> tuple[str, ...]:
        """The Host header names answered: --allowed-hosts, else localhost, 127.0.0.1, ::1 (and --host) on a
        loopback address, else () (any Host: the server was bound to be reached by other names)."""
        from kontext_trt.serve.access import LOOPBACK_HOSTS, is_loopback

        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if is_loopback(self.host):
            return tuple(dict.fromkeys((*LOOPBACK_HOSTS, self.host.strip("[]").lower())))
        return ()

    def model_id(self) -> str:
        """The id /v1/models lists: the name of the folder served (checkpoint, export or engine cache)."""
        from kontext_trt.serve.app import DEFAULT_MODEL_ID

        source = self.load.engines or self.load.onnx or self.load.model
        return (source.resolve().name if source is not None else "") or DEFAULT_MODEL_ID

    def settings(self) -> Settings:
        """The app's settings: timeout, default step cache, limits, access, model id, paths kept out of errors."""
        from kontext_trt.serve.app import Settings
        from kontext_trt.serve.openai_api import Limits

        folders = [p for p in (self.load.model, self.load.onnx, self.load.engines, self.lora_dir) if p is not None]
        limits = Limits(self.max_steps, self.max_pixels, self.max_upload_mib * 2**20, self.max_prompt_bytes)
        return Settings(self.timeout, self.load.cache, limits, self.api_key, self.host_names(), self.cors_origins,
                        self.model_id(), tuple(dict.fromkeys(str(p) for f in folders for p in (f, f.resolve()))))

    def service(self) -> EditService:
        """The model behind the server (loaded and warmed by EditService.load, on the model thread)."""
        from kontext_trt.assemble import build_pipeline
        from kontext_trt.safety.guard import OutputPolicy
        from kontext_trt.serve.service import EditService

        policy = OutputPolicy.from_options(self.safety.checker, self.safety.c2pa_cert, self.safety.c2pa_key,
                                           self.load.device)
        return EditService(lambda: build_pipeline(self.load), warm_request, policy=policy, lora_dir=self.lora_dir,
                           default_loras=list(self.load.loras), max_steps=self.max_steps)

    def batch_size(self, k: Kontext) -> int:
        """Images per batch: --max-batch, else the engine profile's largest batch, else DEFAULT_MAX_BATCH."""
        return self.max_batch or engine_max_batch(k) or DEFAULT_MAX_BATCH


def warm_request(k: Kontext) -> EditRequest:
    """The warm-up request: one step at the engine set's own size with engines, else a 64x64 edit."""
    from kontext_trt.core import image as im
    from kontext_trt.runtime.flow import EditRequest
    from kontext_trt.serve.service import small_edit

    if not k.info.backend.startswith("tensorrt"):
        return small_edit(k)
    from kontext_trt.engines import cache
    from kontext_trt.engines.select import default_geometry

    g = default_geometry(cache.read_engine_manifest(Path(k.info.source)))
    image = None if g.context is None else im.sample_image(*g.context)
    return EditRequest(prompts=["warm up"] * g.batch, image=image, width=g.width, height=g.height, steps=1,
                       auto_resize=False)


def engine_max_batch(k: Kontext) -> int | None:
    """The largest batch of the engine profile the pipeline runs, if it runs engines."""
    if not k.info.backend.startswith("tensorrt"):
        return None
    from kontext_trt.engines import cache, profiles

    manifest = cache.read_engine_manifest(Path(k.info.source))
    build = manifest.build if manifest else {}
    return profiles.parse_batch(build.get("batch", "1"))[1]


def run_local(config: ServeConfig) -> int:
    """One process: uvicorn, the micro-batcher, the model on one thread, safety steps and encoding on a worker pool;
    slow clients are cut off after --read-timeout. SIGTERM drains, then exits 0."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from kontext_trt.serve.app import create_app
    from kontext_trt.serve.batcher import MicroBatcher
    from kontext_trt.serve.metrics import Metrics
    from kontext_trt.serve.slow import ReadDeadline, header_deadline

    service = config.service()
    metrics = Metrics()
    batcher = MicroBatcher(service, metrics, config.max_batch or DEFAULT_MAX_BATCH, config.max_queue,
                           config.batch_window_ms / 1e3)
    failure: list[BaseException] = []

    async def lifespan(app):
        batcher.start()
        loading = asyncio.get_running_loop().run_in_executor(batcher.model_thread, service.load)
        loading.add_done_callback(lambda done: loaded(done.exception()))
        yield
        await batcher.stop()

    def loaded(exc: BaseException | None) -> None:
        if exc is not None:
            failure.append(exc)
            server.should_exit = True
            return
        batcher.max_batch = config.batch_size(service.k)
        log.info("ready: serving on http://%s:%d (max batch %d)", config.host, server_port(server), batcher.max_batch)

    app = ReadDeadline(create_app(batcher, metrics, config.settings(), lifespan), config.read_timeout)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           timeout_graceful_shutdown=config.drain_timeout, access_log=False,
                                           http=header_deadline(AutoHTTPProtocol, config.read_timeout),
                                           timeout_keep_alive=config.keep_alive_timeout))
    # uvicorn re-raises the signal it drained on; a handler that ignores SIGTERM makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if failure:
        if isinstance(failure[0], KontextError):
            raise failure[0]
        raise KontextError(f"the model failed to load: {failure[0].__class__.__name__}: {failure[0]}")
    return 0


def server_port(server) -> int:
    """The port uvicorn listens on (the one picked for --port 0)."""
    for s in getattr(server, "servers", []):
        for sock in s.sockets:
            return sock.getsockname()[1]
    return server.config.port
