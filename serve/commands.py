"""`kontext-trt serve`: the OpenAI-compatible edit server, in one process (uvicorn) or on Ray Serve (--ray)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from kontext_trt.runtime.errors import KontextError

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 4


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register serve."""
    from kontext_trt.runtime.commands import add_cache_argument, add_model_arguments
    from kontext_trt.safety.commands import add_output_arguments

    p = sub.add_parser("serve", help="serve edits over HTTP (OpenAI Images API), micro-batched; --ray for Ray Serve")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=positive, help=f"images per batch (default: the engine profile's largest "
                   f"batch with --engines, else {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=positive, default=64, help="queued requests beyond which new ones get 429")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long the first request of a batch waits "
                   "for others of its size and steps")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before it gets 504")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to finish in-flight "
                   "requests before exiting")
    add_cache_argument(p, "the step cache of requests without a `cache` field")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--lora-dir", type=Path, help="folder of named LoRAs (NAME.safetensors or NAME/) a request picks "
                   "with its `lora` field (NAME[:SCALE],...); batches group by LoRA set and swap between batches")
    add_ray_arguments(p)
    add_output_arguments(p)
    p.set_defaults(func=run_serve)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """--ray and its scale-out options."""
    g = p.add_argument_group("Ray Serve (scale-out over GPUs and nodes)")
    g.add_argument("--ray", action="store_true", help="serve the same app as a Ray Serve deployment")
    g.add_argument("--replicas", type=positive, help="fixed number of replicas (default 1)")
    g.add_argument("--autoscale", type=parse_autoscale, metavar="MIN:MAX", help="autoscale replicas on load")
    g.add_argument("--gpus-per-replica", type=float, default=1.0, help="GPUs each replica holds where the cluster "
                   "has GPUs (none on a CPU-only cluster)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0)
    g.add_argument("--address", help="join an existing Ray cluster (e.g. auto, or ray://head:10001); default: start "
                   "a local one")


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_autoscale(text: str) -> tuple[int, int]:
    """argparse type: 'MIN:MAX' replicas -> (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale takes MIN:MAX replicas, like 1:4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot be served, with one line, before anything loads."""
    if args.timeout <= 0 or args.drain_timeout < 0 or args.batch_window_ms < 0:
        raise KontextError("--timeout must be positive and --batch-window-ms and --drain-timeout not negative")
    if not 0 <= args.port <= 65535:
        raise KontextError(f"--port {args.port} is not a TCP port: use 0..65535 (0: any free port)")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise KontextError(f"--lora-dir {args.lora_dir} is not a folder: pass the folder of NAME.safetensors LoRAs")
    if args.model is not None and not Path(args.model).exists():
        raise KontextError(f"--model {args.model} does not exist: pass a checkpoint folder (or omit --model to "
                           "serve the embedded tiny checkpoint)")


def load_pipeline(args: argparse.Namespace):
    """The pipeline the server runs: as `edit` loads it; the embedded tiny checkpoint when nothing is given."""
    from kontext_trt.runtime.commands import load_edit_pipeline
    from kontext_trt.serve.service import default_model_dir, ensure_tiny_checkpoint

    if args.model is None and args.engines is None and args.backend == "torch":
        args.model = ensure_tiny_checkpoint(default_model_dir())
    return load_edit_pipeline(args, None)


def warm_request(k):
    """The warm-up request: one step at the engine set's own size with --engines, else a 64x64 edit."""
    from kontext_trt.runtime import image as im
    from kontext_trt.runtime.flow import EditRequest
    from kontext_trt.serve.service import small_edit

    if not k.info.backend.startswith("tensorrt"):
        return small_edit(k)
    from kontext_trt.runtime.engine_select import default_geometry

    g = default_geometry(Path(k.info.source))
    image = None if g.context is None else im.sample_image(*g.context)
    return EditRequest(prompts=["warm up"] * g.batch, image=image, width=g.width, height=g.height, steps=1,
                       auto_resize=False)


def engine_max_batch(k) -> int | None:
    """The largest batch of the engine profile the pipeline runs, if it runs engines."""
    if not k.info.backend.startswith("tensorrt"):
        return None
    from kontext_trt.engines import cache, profiles

    build = (cache.read_engine_manifest(Path(k.info.source)) or {}).get("build", {})
    return profiles.parse_batch(build.get("batch", "1"))[1]


def run_serve(args: argparse.Namespace) -> int:
    """kontext-trt serve."""
    check_arguments(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # --log-level rules the server (over -v/--quiet)
    if getattr(args, "ray", False):
        from kontext_trt.serve.ray_app import run_ray

        return run_ray(args)
    return run_local(args)


def run_local(args: argparse.Namespace) -> int:
    """One process: uvicorn, the micro-batcher, the model on one thread. SIGTERM drains, then exits 0."""
    import uvicorn

    from kontext_trt.serve.app import Settings, create_app
    from kontext_trt.serve.batcher import MicroBatcher
    from kontext_trt.serve.metrics import Metrics
    from kontext_trt.serve.service import EditService

    from kontext_trt.safety.commands import output_policy

    service = EditService(lambda: load_pipeline(args), warm_request, policy=output_policy(args, args.device),
                          lora_dir=args.lora_dir, default_loras=args.lora)
    metrics = Metrics()
    batcher = MicroBatcher(service, metrics, args.max_batch or DEFAULT_MAX_BATCH, args.max_queue,
                           args.batch_window_ms / 1e3)
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
        batcher.max_batch = args.max_batch or engine_max_batch(service.k) or DEFAULT_MAX_BATCH
        log.info("ready: serving on http://%s:%d (max batch %d)", args.host, server_port(server), batcher.max_batch)

    app = create_app(batcher, metrics, Settings(args.timeout, args.cache), lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, access_log=False))
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
