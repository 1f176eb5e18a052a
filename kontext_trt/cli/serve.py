"""`kontext-trt serve`: the OpenAI-compatible edit server, in one process (uvicorn) or on Ray Serve (--ray)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from kontext_trt.cli.edit import load_spec
from kontext_trt.cli.safety import output_spec
from kontext_trt.core.errors import KontextError
from kontext_trt.serve.server import DEFAULT_MAX_BATCH, ServeConfig

log = logging.getLogger(__name__)
LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "KONTEXT_TRT_API_KEY"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register serve."""
    from kontext_trt.cli.edit import add_cache_argument, add_model_arguments
    from kontext_trt.cli.safety import add_output_arguments

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
    p.add_argument("--read-timeout", type=float, default=60.0, help="seconds a client may take to send a request's "
                   "headers, and then its body: slower ones are cut off (408)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection "
                   "stays open")
    add_cache_argument(p, "the step cache of requests without a `cache` field")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="the server's log level (default: info, -v debug, "
                   "-q error); given, it wins over -v/-q")
    p.add_argument("--lora-dir", type=Path, help="folder of named LoRAs (NAME.safetensors or NAME/) a request picks "
                   "with its `lora` field (NAME[:SCALE],...); batches group by LoRA set and swap between batches")
    add_access_arguments(p)
    add_limit_arguments(p)
    add_ray_arguments(p)
    add_output_arguments(p)
    p.set_defaults(func=run_serve)


def add_access_arguments(p: argparse.ArgumentParser) -> None:
    """--api-key, --allowed-hosts, --cors-origin."""
    g = p.add_argument_group("access (who may call the server)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help=f"require `Authorization: Bearer KEY` on every route but /healthz and the page at / (default: "
                   f"${API_KEY_ENV}; prefer the variable: a flag shows in ps). Without it anyone who reaches the "
                   "port can run edits")
    g.add_argument("--allowed-hosts", type=parse_hosts, metavar="HOSTS", help="comma-separated Host header names "
                   "answered (NAME on any port, NAME:PORT, *.DOMAIN, or * for any); others get 400 (DNS rebinding). "
                   "Default: localhost,127.0.0.1,[::1] when --host is a loopback address; NO restriction when bound "
                   "elsewhere (name your public hosts here, and set --api-key)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="let pages of ORIGIN "
                   "(scheme://host[:port], repeatable, * for any) call the API from a browser; default: CORS off, "
                   "and POSTs from other origins' pages get 403")


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-steps, --max-pixels, --max-upload-mib, --max-prompt-bytes: what one request may ask."""
    g = p.add_argument_group("limits (what one request may ask; over them: 400, or 413 for uploads)")
    g.add_argument("--max-steps", type=positive, default=100, metavar="N",
                   help="most denoising steps a request may ask (default 100; a request that sends none runs the "
                   "model's default, FLUX.1 28, FLUX.2 [klein] 4 step-distilled or 50 base, at most N)")
    g.add_argument("--max-pixels", type=positive, default=4096 * 4096, metavar="N",
                   help="most pixels of an input image, read from its header before decoding (default 4096x4096)")
    g.add_argument("--max-upload-mib", type=positive, default=32, metavar="MIB",
                   help="most MiB of an uploaded image, counted while it arrives (default 32)")
    g.add_argument("--max-prompt-bytes", type=positive, default=4096, metavar="N",
                   help="most UTF-8 bytes of a prompt or negative prompt (default 4096; longer ones are refused; the "
                   "encoders read 77 CLIP tokens and the model's T5 length, 512 for FLUX.1 Kontext [dev])")


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


def parse_hosts(text: str) -> tuple[str, ...]:
    """argparse type: --allowed-hosts NAME[:PORT],... -> names ("*" alone: any)."""
    hosts = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    if not hosts or any("/" in host or " " in host for host in hosts):
        raise argparse.ArgumentTypeError(f"--allowed-hosts takes host names like example.com,10.0.0.5:8000 or *, "
                                         f"got {text!r}")
    return hosts


def check_origin(origin: str) -> str:
    """A --cors-origin value: scheme://host[:port] with no path, or *."""
    parts = urlsplit(origin)
    if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")
                          or parts.query or parts.fragment):
        raise KontextError(f"--cors-origin {origin!r} is not an origin: write it like https://app.example.com or "
                           "http://localhost:3000 (no path)", param="cors_origin", code="invalid_value")
    return origin.rstrip("/")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot be served, with one line, before anything loads."""
    if args.model is None and args.onnx is None and args.engines is None:
        raise KontextError("serve needs a model: pass --model CHECKPOINT_DIR (or --onnx EXPORT_DIR with --backend "
                           "onnxruntime, or --engines DIR); `kontext-trt synth DIR` writes a test checkpoint",
                           param="model", code="missing_argument")
    if args.timeout <= 0 or args.drain_timeout < 0 or args.batch_window_ms < 0:
        raise KontextError("--timeout must be positive and --batch-window-ms and --drain-timeout not negative",
                           param="timeout", code="out_of_range")
    for flag in ("read_timeout", "keep_alive_timeout"):
        if not 0 < getattr(args, flag) < float("inf"):
            raise KontextError(f"--{flag.replace('_', '-')} must be a positive number of seconds, got "
                               f"{getattr(args, flag)}", param=flag, code="out_of_range")
    if not 0 <= args.port <= 65535:
        raise KontextError(f"--port {args.port} is not a TCP port: use 0..65535 (0: any free port)", param="port",
                           code="out_of_range")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise KontextError(f"--lora-dir {args.lora_dir} is not a folder: pass the folder of NAME.safetensors LoRAs",
                           param="lora_dir", code="not_found")
    if args.model is not None and not Path(args.model).exists():
        raise KontextError(f"--model {args.model} does not exist: pass a checkpoint folder", param="model",
                           code="not_found")
    if args.replicas is not None and args.autoscale:
        raise KontextError("give --replicas N or --autoscale MIN:MAX, not both", param="replicas")
    if args.api_key is not None and (not args.api_key.strip() or any(c.isspace() for c in args.api_key)):
        raise KontextError(f"--api-key (or ${API_KEY_ENV}) is empty or holds spaces: use a long random token, e.g. "
                           "from `openssl rand -hex 32`", param="api_key", code="invalid_value")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed serve flags, checked."""
    check_arguments(args)
    return ServeConfig(load_spec(args), output_spec(args), host=args.host, port=args.port, max_batch=args.max_batch,
                       max_queue=args.max_queue, batch_window_ms=args.batch_window_ms, timeout=args.timeout,
                       drain_timeout=args.drain_timeout, read_timeout=args.read_timeout,
                       keep_alive_timeout=args.keep_alive_timeout, log_level=serve_log_level(args),
                       lora_dir=args.lora_dir,
                       replicas=args.replicas or 1, autoscale=args.autoscale, gpus_per_replica=args.gpus_per_replica,
                       cpus_per_replica=args.cpus_per_replica, address=args.address, api_key=args.api_key,
                       allowed_hosts=args.allowed_hosts,
                       cors_origins=tuple(dict.fromkeys(check_origin(o) for o in args.cors_origin)),
                       max_steps=args.max_steps, max_pixels=args.max_pixels, max_upload_mib=args.max_upload_mib,
                       max_prompt_bytes=args.max_prompt_bytes)


def serve_log_level(args: argparse.Namespace) -> str:
    """The server's log level: --log-level when given, else info (its `ready: serving on` line), -v debug,
    -q error."""
    if args.log_level is not None:
        return args.log_level
    return "error" if args.quiet else "debug" if args.verbose else "info"


def run_serve(args: argparse.Namespace) -> int:
    """kontext-trt serve."""
    from kontext_trt.cli.main import set_log_level

    config = serve_config(args)
    set_log_level(getattr(logging, config.log_level.upper()), "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.api_key is None and not set(config.host_names()) - {"*"}:
        log.warning("serving on %s with no --api-key and no --allowed-hosts: anyone who reaches this port can run "
                    "edits", config.host)
    if args.ray:
        from kontext_trt.serve.ray_app import run_ray

        return run_ray(config)
    from kontext_trt.serve.server import run_local

    return run_local(config)


def app_builder(config: dict):
    """The Ray Serve config entry point (serveConfigV2 in a KubeRay RayService, or `serve run`): config["flags"] holds
    `kontext-trt serve` flags, e.g. "--engines /cache/engines --max-batch 4"; the config's `deployments` section may
    override replicas and resources."""
    from kontext_trt.cli.main import build_parser
    from kontext_trt.serve.ray_app import deployment

    args = build_parser().parse_args(["serve", "--ray", *shlex.split(config.get("flags", ""))])
    if args.allowed_hosts is None:  # Ray's http_options bind the proxy here, not --host: no Host restriction
        args.allowed_hosts = ("*",)
    return deployment(serve_config(args))
