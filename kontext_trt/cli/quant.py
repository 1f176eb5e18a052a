"""Subcommands of the quant folder: kontext-trt quantize, quantize-export."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register quantize and quantize-export."""
    from kontext_trt.cli.edit import add_device_argument, add_lora_argument

    p = sub.add_parser("quantize", help="FP8 / NVFP4 post-training quantization of the transformer (ModelOpt "
                                        "calibration over real edits), a quality report, and the Q/DQ ONNX")
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (diffusers layout or BFL single files)")
    p.add_argument("--precision", required=True, help="fp8 or nvfp4")
    p.add_argument("--out", type=Path, required=True,
                   help="folder: quant/ (saved calibration), report.json + report.md, transformer/ + manifest.json")
    p.add_argument("--calib", type=Path, help="folder of IMAGE.png + IMAGE.txt pairs, or a JSONL file of "
                                              "{\"image\": path, \"prompt\": text}; default: the shipped drawn set")
    p.add_argument("--calib-size", type=int, default=32, help="calibration edits (default 32)")
    p.add_argument("--calib-steps", type=int, default=20, help="denoising steps per calibration and report edit")
    p.add_argument("--attention", help="fp8 or bf16 (default: bf16 with --precision fp8, fp8 with nvfp4)")
    p.add_argument("--svd-rank", type=int, help="SVDQuant: rank of the bf16 low-rank branch of every NVFP4 layer "
                                                "(default 32; 0: plain NVFP4)")
    p.add_argument("--svd-alpha", type=float, help="SVDQuant smoothing strength in [0, 1] (default: searched per "
                                                   "layer, as ModelOpt's awq_lite)")
    p.add_argument("--report-size", type=int, default=4, help="held-out edits the quality report compares")
    p.add_argument("--dtype", default="bf16", help="ONNX dtype: bf16 for TensorRT, fp32 for ONNX Runtime")
    p.add_argument("--no-auto-resize", dest="auto_resize", action="store_false",
                   help="keep the calibration images' own size instead of their Kontext bucket (quick CPU runs)")
    add_device_argument(p)
    add_lora_argument(p)
    p.set_defaults(func=run_quantize)

    p = sub.add_parser("quantize-export", help="export the Q/DQ transformer ONNX again from a saved calibration "
                                               "(another --dtype), without calibrating")
    p.add_argument("--model", type=Path, required=True, help="the checkpoint the calibration was made on")
    p.add_argument("--out", type=Path, required=True, help="the folder `kontext-trt quantize` wrote")
    p.add_argument("--dtype", default="bf16", help="bf16 for TensorRT, fp32 for ONNX Runtime")
    p.set_defaults(func=run_quantize_export)


def run_quantize(args: argparse.Namespace) -> int:
    """kontext-trt quantize: prints the quality report (Markdown) at the end."""
    from kontext_trt.core.checkpoint import open_checkpoint
    from kontext_trt.core.family import family_named
    from kontext_trt.quant.quantize import QuantizeRequest, quantize
    from kontext_trt.quant.report import markdown

    report = quantize(QuantizeRequest(
        model=args.model, precision=args.precision, out=args.out, calib=args.calib, calib_size=args.calib_size,
        calib_steps=args.calib_steps, attention=args.attention, report_size=args.report_size, dtype=args.dtype,
        auto_resize=args.auto_resize, device=args.device, loras=tuple(args.lora), svd_rank=args.svd_rank,
        svd_alpha=args.svd_alpha))
    print(markdown(report))
    family = family_named(open_checkpoint(args.model).family)
    others = ",".join(stage for stage in family.stage_names if stage != "transformer")
    print(f"{args.out / 'manifest.json'}: add the other stages with `kontext-trt export --model {args.model} --out "
          f"{args.out} --stages {others}`, then `kontext-trt build --onnx {args.out} --precision {args.precision}`")
    return 0


def run_quantize_export(args: argparse.Namespace) -> int:
    """kontext-trt quantize-export."""
    from kontext_trt.quant.export import export_quantized

    print(export_quantized(args.model, args.out, args.dtype))
    return 0
