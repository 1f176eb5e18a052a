"""Subcommands `bench run` (measure, write JSON + Markdown + PNGs), `bench serve` (load a server) and `bench compare
A.json B.json`."""
from __future__ import annotations

import argparse
from pathlib import Path

from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.core.image import parse_sizes
from kontext_trt.core.specs import CacheSpec, LoadSpec, parse_cache

GRAPH_MODES = {"off": [False], "on": [True], "both": [False, True]}


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each at least 1."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `bench run`, `bench serve` and `bench compare`."""
    from kontext_trt.benchmarks.bench import BACKENDS
    from kontext_trt.cli.edit import add_device_argument, add_engine_selection, add_lora_argument

    bench = sub.add_parser("bench", help="latency and memory benchmarks: per-stage percentiles, roofline, plots")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("run", help="measure the loop over sizes x batches (x CUDA graphs) and write the results")
    p.add_argument("--engines", type=Path, help="folder of TensorRT engines (instead of --backend)")
    add_engine_selection(p)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--model", type=Path, help="checkpoint folder; with --onnx or --engines it still gives the FLOP "
                   "model its transformer config (no roofline figures without it)")
    p.add_argument("--onnx", type=Path, help="exported ONNX folder, for --backend onnxruntime")
    p.add_argument("--sizes", type=arg_type(parse_sizes), default=[(1024, 1024)],
                   help="output sizes WxH, comma-separated; "
                   "the input image has the same size")
    p.add_argument("--steps", type=int, help="denoising steps per edit (default: the model's: FLUX.1 28; FLUX.2 "
                   "[klein] 4 step-distilled, 50 base); the results record the steps run")
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes, comma-separated")
    p.add_argument("--references", type=int_list, default=[1], help="reference images per edit, comma-separated "
                   "(FLUX.2 [klein]: 1 to 4, latency by count; FLUX.1 Kontext: 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed edits per configuration")
    p.add_argument("--iters", type=int, default=10, help="timed edits per configuration")
    p.add_argument("--cuda-graphs", choices=tuple(GRAPH_MODES), default="off")
    p.add_argument("--cache", action="append", type=arg_type(parse_cache), metavar="SPEC",
                   help="step cache: off, fbcache:T or teacache:T; repeat to measure several (default off)")
    p.add_argument("--quality", action="store_true", help="with --cache: PSNR, SSIM and per-step cosine of each "
                   "cached configuration against the uncached edit of the same seed")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    add_device_argument(p)
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--safety-checker", default="nudenet", metavar="nudenet|none|module:callable",
                   help="the checker timed with each edit, as edit runs it (default: nudenet); the watermark is "
                   "timed too")
    add_lora_argument(p)
    p.set_defaults(func=run_bench_command)

    p = bsub.add_parser("serve", help="load a server on this machine (kontext-trt serve) at several concurrencies: "
                        "throughput and p50/p95/p99 latency in bench run's results format")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="edits per concurrency level")
    p.add_argument("--warmup", type=int, default=2, help="edits before the first level, not counted")
    p.add_argument("--size", type=arg_type(parse_sizes), default=[(512, 512)],
                   help="WxH of the input image and the output")
    p.add_argument("--steps", type=int, help="denoising steps per edit (default: none sent, the server runs the "
                   "model's; the results record the steps run)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="per level: no request starts after this")
    p.add_argument("--out", type=Path, default=Path("out/bench-serve"))
    p.set_defaults(func=run_serve_bench_command)

    p = bsub.add_parser("compare", help="B/A ratios of p50 latencies per stage and end to end")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.set_defaults(func=run_compare_command)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse combinations the benchmark cannot run, with one line each."""
    from kontext_trt.core.checks import check_output_folder
    from kontext_trt.core.image import check_size

    check_output_folder(args.out)
    if args.engines is None and args.backend == "torch" and args.model is None:
        raise KontextError("nothing to measure: pass --model CHECKPOINT_DIR, --backend onnxruntime --onnx DIR "
                           "or --engines DIR")
    if args.engines is None and (args.precision is not None or args.sku != "auto"):
        raise KontextError("--precision and --sku pick an engine set: add --engines DIR (backends take --dtype)")
    if (args.onnx is not None) != (args.backend == "onnxruntime"):
        raise KontextError("--backend onnxruntime and --onnx DIR (made by `kontext-trt export`) go together")
    if args.cuda_graphs != "off" and (args.device != "cuda" or args.warmup < 1):
        raise KontextError("--cuda-graphs on|both needs --device cuda and --warmup 1 or more (capture is warm-up)")
    if (args.steps is not None and args.steps < 1) or args.iters < 1 or args.warmup < 0:
        raise KontextError("--steps and --iters must be at least 1 and --warmup at least 0")
    for width, height in args.sizes:
        check_size(width, height)


def run_bench_command(args: argparse.Namespace) -> int:
    """kontext-trt bench run."""
    from kontext_trt.benchmarks.bench import run_bench
    from kontext_trt.benchmarks.harness import run_configs
    from kontext_trt.benchmarks.report import markdown, write_all
    from kontext_trt.safety.guard import OutputPolicy

    check_arguments(args)
    caches = args.cache or [CacheSpec()]
    cached = [spec for spec in caches if spec.policy != "off"]  # any: the engines' transformer in three parts
    spec = LoadSpec(args.model, backend="tensorrt" if args.engines else args.backend, dtype=args.dtype,
                    device=args.device, onnx=args.onnx, engines=args.engines, precision=args.precision, sku=args.sku,
                    loras=tuple(args.lora), cache=cached[0] if cached else CacheSpec())
    configs = run_configs(args.sizes, args.batch, args.steps, GRAPH_MODES[args.cuda_graphs], caches, args.references)
    policy = OutputPolicy.from_options(args.safety_checker, device=args.device)
    results = run_bench(spec, configs, args.warmup, args.iters, policy, args.quality)
    paths = write_all(results, args.out)
    print(markdown(results))
    for path in paths:
        print(path)
    return 0


def run_serve_bench_command(args: argparse.Namespace) -> int:
    """kontext-trt bench serve."""
    from kontext_trt.benchmarks.loadgen import run_load
    from kontext_trt.benchmarks.report import markdown, write_all
    from kontext_trt.core.image import check_size

    steps_ok = args.steps is None or args.steps >= 1
    if len(args.size) != 1 or args.requests < 1 or args.warmup < 0 or not steps_ok or args.max_seconds <= 0:
        raise KontextError("bench serve takes one --size, --requests and --steps of at least 1, --warmup of 0 or "
                           "more and a positive --max-seconds")
    check_size(*args.size[0])
    results = run_load(args.url, args.concurrency, args.requests, args.warmup, *args.size[0], args.steps,
                       max_seconds=args.max_seconds)
    paths = write_all(results, args.out)
    print(markdown(results))
    for path in paths:
        print(path)
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    """kontext-trt bench compare."""
    from kontext_trt.benchmarks.report import compare, load_results

    print(compare(load_results(args.a), load_results(args.b)), end="")
    return 0
