"""Subcommands `train shapes` (train the shapes Kontext on this machine) and `eval` (score a shapes model's edits)."""
from __future__ import annotations

import argparse
from pathlib import Path

from kontext_trt.core.errors import KontextError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train shapes` and `eval`."""
    from kontext_trt.cli.edit import add_cache_argument, add_model_arguments

    train = sub.add_parser("train", help="train a small Kontext from scratch on a procedural task (CPU, under 1 h)")
    tsub = train.add_subparsers(dest="train_command", required=True)
    p = tsub.add_parser("shapes", help="the shapes edit task: VAE, then transformer; writes weights, log, loss PNG")
    p.add_argument("--out", type=Path, required=True, help="folder for shapes.safetensors, shapes.json, train.log, "
                   "loss.png (copy the first two to kontext_trt/synth/data/shapes/ to ship them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="an earlier run's --out: start from its weights (VAE kept) and train "
                   "the transformer further")
    p.add_argument("--steps", type=int, help="transformer steps (default 5000)")
    p.add_argument("--lr", type=float, help="transformer peak learning rate (default 6e-4)")
    p.add_argument("--train-text", action="store_true", help="train the text encoders with the transformer")
    p.add_argument("--edit-weight", type=float, help="loss weight of the target tokens an edit changes (default 1: "
                   "all tokens alike; e.g. 4 to learn the edit itself faster)")
    p.add_argument("--ema", type=float, help="end with the moving average of the trained weights (transformer, and "
                   "text encoders with --train-text) over the steps, this decay per step (e.g. 0.999; default 0: the "
                   "last step's weights)")
    p.set_defaults(func=run_train_shapes)

    p = sub.add_parser("eval", help="edit accuracy and untouched-region PSNR of a shapes model on held-out scenes")
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=200, help="held-out edits, the four instruction kinds in turn")
    p.add_argument("--seed", type=int, default=0, help="held-out scene seed (offset into the held-out range)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--batch", type=int, default=8, help="edits per loop batch")
    add_cache_argument(p, "step cache")
    p.add_argument("--quantized", type=Path, metavar="DIR", help="a `kontext-trt quantize` folder of --model: run its "
                   "FP8 or NVFP4 transformer as the bit-exact torch emulation (any device; torch backend, --dtype)")
    p.add_argument("--images", type=Path, metavar="DIR", help="write the outputs here (0000.png, ... and run.json), "
                   "to serve as another run's --reference")
    p.add_argument("--reference", type=Path, metavar="DIR", help="compare each output with the one an earlier run "
                   "wrote with --images DIR (same --seed, --steps, --guidance): PSNR and SSIM")
    p.add_argument("--write-calib", type=Path, metavar="DIR", help="write --n training-range shapes edits as "
                   "IMAGE.png + IMAGE.txt pairs (a `kontext-trt quantize --calib` set) and stop")
    p.add_argument("--json", type=Path, help="write the full result (per-edit records included) here")
    p.set_defaults(func=run_eval)


def run_train_shapes(args: argparse.Namespace) -> int:
    """kontext-trt train shapes."""
    from dataclasses import replace

    from kontext_trt.core.checks import check_output_folder, check_seed
    from kontext_trt.synth.trained import trained_files
    from kontext_trt.train.flow import FlowRecipe
    from kontext_trt.train.shapes import train_shapes

    check_output_folder(args.out, "--out")
    check_seed(args.seed)
    changes = {"steps": args.steps, "lr": args.lr, "train_text": args.train_text or None,
               "edit_weight": args.edit_weight, "ema": args.ema}
    recipe = replace(FlowRecipe(), **{k: v for k, v in changes.items() if v is not None})
    if recipe.steps < 1:
        raise KontextError(f"--steps {recipe.steps}: use 1 or more", "steps", "out_of_range")
    if not recipe.lr > 0 or recipe.lr == float("inf"):
        raise KontextError(f"--lr {recipe.lr}: use a positive learning rate such as 4e-4", "lr", "out_of_range")
    if not recipe.edit_weight >= 1 or recipe.edit_weight == float("inf"):
        raise KontextError(f"--edit-weight {recipe.edit_weight}: use a finite weight of 1 or more, such as 4",
                           "edit_weight", "out_of_range")
    if not 0 <= recipe.ema < 1:
        raise KontextError(f"--ema {recipe.ema}: use a decay in [0, 1), such as 0.999", "ema", "out_of_range")
    if args.resume is not None and not all(path.is_file() for path in trained_files("shapes", args.resume)):
        raise KontextError(f"--resume {args.resume}: no shapes.json and shapes.safetensors there; give the --out of "
                           "an earlier `kontext-trt train shapes`", "resume", "not_found")
    out = train_shapes(args.out, args.seed, flow_recipe=recipe, resume=args.resume)
    for name in ("shapes.safetensors", "shapes.json", "train.log", "loss.png"):
        print(out / name)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """kontext-trt eval: load the model as `edit` does (its transformer emulated as --quantized says), score held-out
    edits, print the table (and write JSON)."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.benchmarks.shapes_eval import evaluate, meets_bars, table, write_calibration
    from kontext_trt.cli.edit import load_spec
    from kontext_trt.core import checks
    from kontext_trt.core.files import write_json

    for name, value, low in (("n", args.n, 1), ("steps", args.steps, 1), ("batch", args.batch, 1)):
        if value < low:
            raise KontextError(f"--{name} {value}: use {low} or more", name, "out_of_range")
    checks.check_seed(args.seed)
    if args.write_calib is not None:
        checks.check_output_folder(args.write_calib, "--write-calib")
        print(write_calibration(args.write_calib, args.n, args.seed))
        return 0
    if args.json is not None:  # a JSON file: check_output_file is for images
        if args.json.is_dir():
            raise KontextError(f"--json {args.json} is a folder: give a file name, e.g. {args.json / 'eval.json'}",
                               "json", "invalid_value")
        checks.check_output_folder(args.json.parent, "--json")
    if args.images is not None:
        checks.check_output_folder(args.images, "--images")
    if args.quantized is not None and (args.backend != "torch" or args.engines is not None):
        from kontext_trt.quant.emulate import refusal

        raise KontextError(refusal("TensorRT" if args.engines is not None else args.backend), "quantized")
    k = build_pipeline(load_spec(args))
    if args.quantized is not None:
        from kontext_trt.quant.emulate import with_emulated

        k = with_emulated(k, args.quantized)
    result = evaluate(k, args.n, args.seed, args.steps, args.guidance, args.cache, args.batch, args.images,
                      args.reference)
    result["pipeline"] = k.info.to_dict()
    result["bars_met"] = meets_bars(result)
    print(table(result))
    print("bars (recolour >= 90%, remove and add >= 80%, untouched PSNR >= 28 dB): " +
          ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in result["bars_met"].items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result, indent=2)
        print(args.json)
    return 0
