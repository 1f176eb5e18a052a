"""Subcommands of the runtime: synth, edit, demo."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kontext_trt.cli.safety import add_output_arguments, output_policy
from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.core.specs import CacheSpec, LoadSpec, parse_budget, parse_cache, parse_lora

if TYPE_CHECKING:
    from kontext_trt.runtime.flow import EditRequest, Kontext


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register synth, edit and demo."""
    p = sub.add_parser("synth", help="write a synthetic checkpoint in the real HF (or BFL) layout")
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=("tiny", "slim", "shapes", "klein-tiny", "klein-tiny-base"), default="tiny",
                   help="tiny and slim: random weights; shapes: the trained shapes-task model that ships with the "
                   "package; klein-tiny (step-distilled) and klein-tiny-base (true CFG): a random FLUX.2 [klein]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", dest="fmt", choices=("diffusers", "bfl"), default="diffusers")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--text-length", type=int, metavar="N",
                   help="T5 prompt tokens the checkpoint's tokenizer_2 records (default 512, FLUX.1 Kontext [dev]'s)")
    p.set_defaults(func=run_synth)

    p = sub.add_parser("edit", help="edit an image (or generate from text alone) with a prompt")
    add_model_arguments(p)
    p.add_argument("--image", type=Path, action="append",
                   help="input image; repeat for several references, in order (FLUX.2 [klein]: up to 4; FLUX.1 "
                        "Kontext: one); omit for text-to-image")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch on one image")
    p.add_argument("--out", type=Path, required=True, help="output PNG (batch: OUT-0.png, OUT-1.png, ...)")
    add_sampling_arguments(p)
    add_output_arguments(p)
    p.set_defaults(func=run_edit)

    p = sub.add_parser("demo", help="edit a shapes scene with the trained shapes model (input | output in one PNG)")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 28 for the shapes model)")
    add_output_arguments(p)
    p.set_defaults(func=run_demo)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model/--backend/--onnx/--dtype/--device and the TensorRT options (--engines, memory modes, graphs)."""
    p.add_argument("--model", type=Path, help="checkpoint folder (diffusers layout or BFL single files)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--onnx", type=Path, help="export folder (kontext-trt export) for --backend onnxruntime")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="torch backend weights and compute")
    add_device_argument(p)
    p.add_argument("--engines", type=Path, help="engine cache (kontext-trt build): run this GPU's TensorRT engines")
    add_engine_selection(p)
    p.add_argument("--low-vram", action="store_true", help="with --engines: one engine on the GPU at a time")
    p.add_argument("--weight-streaming-budget", type=arg_type(parse_budget), metavar="BYTES",
                   help="with --engines: keep this much of the transformer's weights on the GPU (e.g. 8GiB, or auto) "
                        "and stream the rest from host memory; needs engines built with --weight-streaming")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the transformer step as a CUDA graph (GPU only)")
    add_lora_argument(p)


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    """--lora PATH[:SCALE], repeatable: transformer LoRAs fused into the weights (runtime.lora)."""
    p.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="PATH[:SCALE]",
                   help="a transformer LoRA (safetensors file, or a folder holding one; diffusers/PEFT, kohya, "
                        "ai-toolkit keys) with its scale (default 1.0); repeat for several")


def add_engine_selection(p: argparse.ArgumentParser) -> None:
    """--precision and --sku: which engine set of the --engines cache runs."""
    from kontext_trt.core.onnx_dir import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, help="with --engines: the engine set's precision (default: the "
                   "only one built for this GPU)")
    p.add_argument("--sku", default="auto", help="with --engines: the SKU whose engines run (default: this GPU's, "
                   "from NVML); another SKU of the same architecture, e.g. h100-sxm engines on an H100 NVL")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling options shared by edit and demo."""
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's: FLUX.1 28; FLUX.2 [klein] 4 "
                   "step-distilled, 50 base)")
    p.add_argument("--guidance", type=float, default=None,
                   help="FLUX.1: distilled guidance (default 2.5); FLUX.2 [klein] base: the CFG scale (default 4.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--no-auto-resize", dest="auto_resize", action="store_false")
    p.add_argument("--negative-prompt")
    p.add_argument("--true-cfg", type=float, default=1.0, help="> 1 with --negative-prompt enables true CFG")
    add_cache_argument(p, "step cache")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """--device, with the one default (runtime.checks.pick_device, resolved by the CLI before the command runs)."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")


def add_cache_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--cache SPEC (edit: this edit's step cache; serve: the default of requests without a `cache` field)."""
    p.add_argument("--cache", default=CacheSpec(), type=arg_type(parse_cache), metavar="SPEC",
                   help=f"{what}: off, fbcache:T "
                   "(First-Block Cache, FLUX default 0.12) or teacache:T (0.25/0.4/0.6); with --engines it loads the "
                   "split transformer (export and build --stages transformer_head,transformer_body,transformer_tail)")


def run_synth(args: argparse.Namespace) -> int:
    """kontext-trt synth."""
    from kontext_trt.synth import write_synthetic_checkpoint

    length = {} if args.text_length is None else {"text_length": args.text_length}
    out = write_synthetic_checkpoint(args.out, preset=args.preset, seed=args.seed, fmt=args.fmt, force=args.force,
                                     **length)
    print(out)
    return 0


def run_edit(args: argparse.Namespace) -> int:
    """kontext-trt edit: the Python API's KontextPipeline.run on the request the flags describe."""
    from kontext_trt.core import checks, image
    from kontext_trt.pipeline import KontextPipeline
    from kontext_trt.runtime import flow

    checks.check_output_file(args.out)
    checks.check_device(args.device)
    request = flow.request(
        args.prompt, [image.load_image(path) for path in args.image or []],
        width=args.width, height=args.height, steps=args.steps, guidance=args.guidance, seed=args.seed,
        auto_resize=args.auto_resize, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, cache=args.cache)
    flow.check_request(request)
    policy = output_policy(args, args.device)
    pipe = KontextPipeline(load_edit_pipeline(args, request), policy)
    k = pipe.kontext
    start = time.perf_counter()
    result = pipe.run(request)
    for path in pipe.save(result, args.out):
        print(path)
    print(f"{result.width}x{result.height}, {result.metadata['steps']} steps in {time.perf_counter() - start:.2f}s")
    cache = result.metadata["cache"]
    if cache["spec"] != "off":
        print(f"cache {cache['spec']}: {cache['steps_computed']} steps computed, {cache['steps_skipped']} skipped")
    print(k.times.table())
    if args.engines is not None:
        from kontext_trt.engines.trt_stages import memory_summary

        print(memory_summary(k.stages))
    return 0


def load_spec(args: argparse.Namespace) -> LoadSpec:
    """The LoadSpec of parsed --model/--backend/--onnx/--engines/... flags (edit, serve and bench take the same)."""
    return LoadSpec(args.model, backend=args.backend, dtype=args.dtype, device=args.device, onnx=args.onnx,
                    engines=args.engines, precision=args.precision, sku=args.sku, low_vram=args.low_vram,
                    weight_budget=args.weight_streaming_budget, cuda_graphs=args.cuda_graphs, loras=tuple(args.lora),
                    cache=args.cache)


def load_edit_pipeline(args: argparse.Namespace, request: EditRequest) -> Kontext:
    """The pipeline `edit` runs on: a checkpoint, an export folder, or the engines for this GPU and this request."""
    from functools import partial

    from kontext_trt.assemble import build_pipeline, request_geometry

    geometry = partial(request_geometry, request) if args.engines is not None else None  # of the set's family
    return build_pipeline(load_spec(args), geometry)


def run_demo(args: argparse.Namespace) -> int:
    """kontext-trt demo: write the trained shapes checkpoint (once), edit a held-out scene with an instruction, and
    save input | output side by side with the edit read back from the pixels."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core import checks, image
    from kontext_trt.core.timing import progress
    from kontext_trt.pipeline import KontextPipeline
    from kontext_trt.runtime import flow
    from kontext_trt.shapes.read import score
    from kontext_trt.shapes.scenes import demo_edit, render
    from kontext_trt.shapes.sheet import side_by_side
    from kontext_trt.synth import write_synthetic_checkpoint

    checks.check_output_folder(args.out)
    if args.steps is not None and args.steps < 1:
        raise KontextError(f"--steps {args.steps}: the demo needs at least 1 step", "steps", "out_of_range")
    args.out.mkdir(parents=True, exist_ok=True)
    policy = output_policy(args)
    model = args.out / "shapes-checkpoint"
    if not (model / "model_index.json").exists():
        with progress(f"writing the trained shapes checkpoint to {model}"):
            write_synthetic_checkpoint(model, preset="shapes", seed=0, force=True)
    source, demo = args.out / "input.png", demo_edit()
    render(demo.source).save(source)
    with progress("loading the checkpoint (torch backend, fp32, cpu)"):
        pipe = KontextPipeline(build_pipeline(LoadSpec(model, backend="torch", dtype="fp32", device="cpu")), policy)
    steps = flow.default_steps(pipe.kontext) if args.steps is None else args.steps
    request = flow.EditRequest(prompts=[demo.prompt], image=image.load_image(source), steps=steps, auto_resize=False)
    with progress(f'editing {source} with "{demo.prompt}" ({steps} steps, 128x128)'):
        result = pipe.run(request)
    out = pipe.save(result, args.out / "edited.png")[0]
    verdict = score(demo, result.images[0])
    line = f"read back: {', '.join(verdict['found']) or 'no shapes'} ({'correct' if verdict['correct'] else 'WRONG'})"
    sheet = args.out / "side_by_side.png"
    side_by_side(render(demo.source), result.images[0], demo.prompt, line).save(sheet)
    print(f"input  {source}\noutput {out} ({result.width}x{result.height})\nsheet  {sheet}\n{line}")
    print(pipe.kontext.times.table())
    return 0
