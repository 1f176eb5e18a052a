"""Subcommand of the export folder: kontext-trt export."""
from __future__ import annotations

import argparse
from pathlib import Path

from kontext_trt.cli.edit import add_lora_argument
from kontext_trt.core.family import FLUX2_KLEIN
from kontext_trt.core.stages import STAGE_NAMES, TRANSFORMER_PARTS, stage_list


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register export."""
    p = sub.add_parser("export", help="export a checkpoint's stages to ONNX (TensorRT-ready, checked in onnxruntime)")
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (diffusers layout or BFL single files)")
    p.add_argument("--out", type=Path, required=True, help="export folder: one subfolder per stage + manifest.json")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help=f"stages separated by commas or spaces (as build "
                   f"takes them), default every stage of the checkpoint's family ({','.join(STAGE_NAMES)} for FLUX.1 "
                   f"Kontext, {','.join(FLUX2_KLEIN.stage_names)} for FLUX.2 [klein]); add "
                   f"{','.join(TRANSFORMER_PARTS)} for step caching (--cache, FLUX.1), written beside the transformer")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                   help="bf16 for TensorRT, fp32 for the onnxruntime backend; fp16 is refused for t5")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23: attention as one Attention op)")
    p.add_argument("--force", action="store_true", help="replace an export of a different checkpoint in --out")
    add_lora_argument(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """kontext-trt export."""
    from kontext_trt.export.export import DEFAULT_OPSET, export_checkpoint

    stages = stage_list(args.stages or []) or None  # None: the family's stages
    path = export_checkpoint(args.model, args.out, stages, args.dtype, args.opset or DEFAULT_OPSET, args.force,
                             loras=args.lora)
    print(path)
    return 0
