"""Subcommands of the engines folder: build, check."""
from __future__ import annotations

import argparse
from pathlib import Path

from kontext_trt.core.errors import KontextError
from kontext_trt.core.image import parse_size
from kontext_trt.core.onnx_dir import PRECISIONS
from kontext_trt.core.stages import stage_list

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register build and check."""
    p = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines for one GPU SKU into the engine cache")
    p.add_argument("--onnx", type=Path, required=True, help="ONNX folder (kontext-trt export, or BFL's Kontext ONNX)")
    p.add_argument("--out", type=Path, required=True, help="engine cache folder")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: the SKU's flavour")
    p.add_argument("--sku", default="auto", help="GPU SKU (engines/skus.py); auto: the GPU NVML finds")
    p.add_argument("--target", help="compute capabilities, e.g. sm86,sm89,sm120 (TensorRT-RTX); default: the SKU's")
    p.add_argument("--precision", choices=PRECISIONS, help="which transformer ONNX to build; default: the one there is")
    p.add_argument("--sizes", default="all", help="all (the 17 Kontext buckets) or WxH,WxH,...")
    p.add_argument("--batch", default="1", help="N or LO-HI")
    p.add_argument("--static", metavar="WxH", help="one fixed size (edit of a WxH image into WxH)")
    p.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache (default: beside the engine folders)")
    p.add_argument("--refit", action="store_true", help="refittable transformer engine: swap LoRAs (edit --lora, "
                   "Kontext.set_loras) without a rebuild; bf16/fp32 exports only")
    p.add_argument("--weight-streaming", action="store_true", help="transformer engine: let it stream weights from "
                   "host memory at run time (edit --weight-streaming-budget)")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="stages separated by commas or spaces (as export "
                   "takes them); default: every stage in the ONNX folder (the step-cache parts too, where exported)")
    p.set_defaults(func=run_build)

    p = sub.add_parser("check", help="compare engine outputs with ONNX Runtime on random inputs (needs a GPU)")
    p.add_argument("--engines", type=Path, required=True, help="engine cache folder")
    p.add_argument("--onnx", type=Path, required=True, help="the ONNX folder the engines were built from")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--sku", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the only precision built")
    p.add_argument("--atol", type=float, default=1e-2)
    p.add_argument("--rtol", type=float, default=1e-2)
    p.set_defaults(func=run_check)


def parse_targets(text: str) -> tuple[int, ...]:
    """'sm86,sm89' -> (86, 89)."""
    try:
        return tuple(dict.fromkeys(int(t.strip().lower().removeprefix("sm")) for t in text.split(",") if t.strip()))
    except ValueError:
        raise KontextError(f"--target {text!r}: write compute capabilities like sm86,sm89,sm120",
                           "target", "invalid_value") from None


def run_build(args: argparse.Namespace) -> int:
    """kontext-trt build."""
    from kontext_trt.core.checks import check_output_folder
    from kontext_trt.engines import build, cache, device, profiles

    check_output_folder(args.out)
    gpu, why = device.detect_gpu()
    sku = device.resolve_sku(args.sku, gpu, why)
    flavor = sku.flavor if args.backend == "auto" else args.backend
    targets = parse_targets(args.target) if args.target else (sku.sm,)
    if sku.sm not in targets:
        raise KontextError(f"--target {args.target} leaves out sm{sku.sm}, the compute capability of {sku.name}: "
                           "add it", "target", "invalid_value")
    batch = profiles.parse_batch(args.batch)
    shapes = (profiles.Shapes((parse_size(args.static),), batch, static=True) if args.static
              else profiles.Shapes(profiles.parse_sizes(args.sizes), batch))
    req = build.BuildRequest(
        onnx_dir=args.onnx, out=args.out, sku=sku, target=build.Target(flavor, targets, gpu.sm if gpu else None),
        precision=args.precision, shapes=shapes, stages=stage_list(args.stages or []),
        flags=build.BuildFlags(args.opt_level, args.refit, args.weight_streaming, args.timing_cache),
        gpu=gpu is not None)
    folder, built = build.build_set(req)
    manifest = cache.read_engine_manifest(folder)
    print(f"{'stage':<18}{'precision':<11}{'status':<12}{'seconds':>9}{'MiB':>10}")
    for stage, entry in manifest.stages.items():
        status = "built" if stage in built else "up to date"
        print(f"{stage:<18}{entry['precision']:<11}{status:<12}{entry['build_seconds']:>9.2f}"
              f"{entry['engine_bytes'] / 2**20:>10.2f}")
    print(folder)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """kontext-trt check: exit 0 when every output is within tolerance, 1 when one is not, 2 without a GPU."""
    from kontext_trt.core.checks import check_finite
    from kontext_trt.core.onnx_dir import read_onnx_dir
    from kontext_trt.engines import cache, check, device, trt_api

    check_finite("--atol", args.atol)
    check_finite("--rtol", args.rtol)
    gpu, why = device.detect_gpu()
    if gpu is None:
        raise KontextError(f"check runs the engines and needs an NVIDIA GPU; none found ({why}): run it on the GPU "
                           "host the engines were built for", "engines", "gpu_unavailable")
    sku = device.resolve_sku(args.sku, gpu, why)
    api = trt_api.load_api(sku.flavor if args.backend == "auto" else args.backend)
    base = args.engines / sku.tag / api.folder
    precision = cache.pick_precision(base, args.precision)
    engines = cache.open_set(base / precision)
    if engines is None:
        built = ", ".join(cache.built_precisions(base)) or "none"
        raise KontextError(f"no engine set in {base} for precision {precision} (built: {built}): "
                           f"build it with kontext-trt build --onnx {args.onnx} --out {args.engines} --precision "
                           f"{precision}", "precision", "not_found")
    for stage, plan in engines.plans.items():
        problem = cache.plan_problem(plan, engines.manifest.stages[stage])
        if problem:
            raise KontextError(f"{problem}: rebuild with {engines.manifest.command}",
                               "engines", "invalid_value")
    rows = check.check_engines(engines, read_onnx_dir(args.onnx), api, args.atol, args.rtol)
    print(check.format_rows(rows))
    return 0 if all(r.get("passed") for r in rows) else 1
