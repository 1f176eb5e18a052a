"""Host time per denoising step around a zero-cost transformer: our flow loop against diffusers' FluxKontextPipeline.

    python -m kontext_trt.benchmarks.host_overhead [--model DIR] [--size 1024x1024] [--steps 28] [--edits 3]
                                                   [--warmup 1] [--seed 0] [--threads 1] [--out out/host-overhead.json]

Both pipelines load the same checkpoint (default: the tiny synthetic one, written to a temporary folder) in fp32 on the
CPU, and each one's transformer is replaced by a stand-in that returns a preallocated zero velocity of the right shape:
ours through Kontext.with_stages(transformer=...), diffusers' by replacing its transformer's forward. The stand-in reads
the clock at every call, so the time between two consecutive calls is one step's host work besides the transformer
(building the step's inputs, the context concatenation, the scheduler or Euler update, casts, the stage call and its
timing). Reported per pipeline: those intervals over every step of `edits` timed edits of one request (same size,
steps, seed, prompt and image; the two pipelines take turns), after `warmup` edits each, and the edits' wall time.
Writes JSON to --out; prints one table line and the JSON path on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.benchmarks.harness import PROMPT, summarize
from kontext_trt.benchmarks.system import system_info
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError, arg_type
from kontext_trt.core.image import parse_sizes
from kontext_trt.core.specs import LoadSpec
from kontext_trt.core.timing import bar
from kontext_trt.runtime.flow import EditRequest, Kontext, edit

SCHEMA = "kontext-trt/host-overhead/1"
OUT = Path("out/host-overhead.json")
GUIDANCE = 2.5


class ZeroVelocity:
    """The clock at every call and the same preallocated zeros, shaped like the hidden states, as the velocity."""

    def __init__(self) -> None:
        self.clock: list[float] = []
        self.zeros: dict[tuple, torch.Tensor] = {}

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.clock.append(time.perf_counter())
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        if key not in self.zeros:
            self.zeros[key] = torch.zeros_like(hidden_states)
        return self.zeros[key]

    def intervals(self) -> list[float]:
        """Seconds between consecutive calls since the last reset, and a reset."""
        clock, self.clock = self.clock, []
        return [b - a for a, b in zip(clock, clock[1:])]


class ZeroTransformerStage:
    """Our transformer stage (named tensors in, {"latent": ...} out) at zero cost."""

    def __init__(self, velocity: ZeroVelocity) -> None:
        self.velocity = velocity

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latent": self.velocity(inputs["hidden_states"])}


def ours(model: Path, velocity: ZeroVelocity) -> Kontext:
    """Our torch pipeline over the checkpoint in fp32 on the CPU, its transformer the zero-cost stage."""
    k = build_pipeline(LoadSpec(model, backend="torch", dtype="fp32", device="cpu"))
    return k.with_stages(transformer=ZeroTransformerStage(velocity))


def reference(model: Path, velocity: ZeroVelocity):
    """diffusers' FluxKontextPipeline over the checkpoint in fp32, its transformer's forward the zero-cost one."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def forward(hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        out = velocity(hidden_states)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    pipe.transformer.forward = forward
    return pipe


def run_reference(pipe, req: EditRequest) -> None:
    """One edit through diffusers with the request's size, steps, guidance, seed and image (as tests/runtime's
    parity test calls it)."""
    pipe(prompt=req.prompts, image=req.image, height=req.height, width=req.width, max_area=req.width * req.height,
         num_inference_steps=req.steps, guidance_scale=req.guidance,
         generator=torch.Generator("cpu").manual_seed(req.seed), output_type="pil", _auto_resize=False)


def measure(model: Path, width: int, height: int, steps: int, edits: int, warmup: int, seed: int) -> dict:
    """Warm up and time both pipelines, taking turns edit by edit; per-step and per-edit statistics of each."""
    req = EditRequest(prompts=[PROMPT], image=im.sample_image(width, height), width=width, height=height, steps=steps,
                      guidance=GUIDANCE, seed=seed, auto_resize=False)
    clocks = {"kontext-trt": ZeroVelocity(), "diffusers": ZeroVelocity()}
    k, pipe = ours(model, clocks["kontext-trt"]), reference(model, clocks["diffusers"])
    runners = {"kontext-trt": lambda: edit(k, req), "diffusers": lambda: run_reference(pipe, req)}
    for _ in bar(range(warmup), "warm-up", unit="edit"):
        for name, run in runners.items():
            run()
            clocks[name].intervals()
    steps_s: dict[str, list[float]] = {name: [] for name in runners}
    walls: dict[str, list[float]] = {name: [] for name in runners}
    for _ in bar(range(edits), "timed", unit="edit"):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            walls[name].append(time.perf_counter() - start)
            intervals = clocks[name].intervals()
            if len(intervals) != steps - 1:
                raise KontextError(f"{name} called the transformer {len(intervals) + 1} times in a {steps}-step edit")
            steps_s[name] += intervals
    results = {name: {"step_ms": summarize(steps_s[name]), "edit_ms": summarize(walls[name])} for name in runners}
    ratio = results["diffusers"]["step_ms"]["p50"] / results["kontext-trt"]["step_ms"]["p50"]
    return {**results, "diffusers_over_ours": ratio}


def table_line(report: dict) -> str:
    """One line: the median host ms per step of both pipelines and the setting."""
    ours_ms, ref_ms = (report["results"][name]["step_ms"]["p50"] for name in ("kontext-trt", "diffusers"))
    return (f"host ms per step (median; {report['size']}, {report['steps']} steps, {report['edits']} edits, fp32, "
            f"CPU, zero-cost transformer): kontext-trt {ours_ms:.3f} | diffusers FluxKontextPipeline {ref_ms:.3f}")


def run(model: Path | None, width: int, height: int, steps: int, edits: int, warmup: int, seed: int) -> dict:
    """The report: over --model, or over the tiny synthetic checkpoint written to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="host-overhead-") as tmp:
        if model is None:
            from kontext_trt.synth import write_synthetic_checkpoint

            model = write_synthetic_checkpoint(Path(tmp) / "tiny")
            source = "tiny synthetic checkpoint (kontext-trt synth, seed 0)"
        else:
            source = str(model)
        measured = measure(model, width, height, steps, edits, warmup, seed)
    ratio = measured.pop("diffusers_over_ours")
    return {"schema": SCHEMA, "checkpoint": source, "size": f"{width}x{height}", "steps": steps, "edits": edits,
            "warmup": warmup, "seed": seed, "dtype": "fp32", "device": "cpu",
            "transformer": "zero-cost stand-in: a preallocated zero velocity, the clock read at each call",
            "results": measured, "diffusers_over_ours": ratio, "system": system_info(torch.device("cpu"))}


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m kontext_trt.benchmarks.host_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a diffusers-layout checkpoint (default: the tiny synthetic one)")
    p.add_argument("--size", type=arg_type(parse_sizes), default=[(1024, 1024)], help="WxH of output and input image")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--edits", type=int, default=3, help="timed edits per pipeline")
    p.add_argument("--warmup", type=int, default=1, help="untimed edits per pipeline first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: a GPU pipeline's host loop is one thread, and one thread "
                        "keeps other jobs on a shared machine from stalling a thread pool)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.steps < 2 or args.edits < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps needs 2 or more (a step is the time between two transformer calls), --edits and --threads "
                "1 or more, --warmup 0 or more")
    (width, height), = args.size
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run(args.model, width, height, args.steps, args.edits, args.warmup, args.seed)
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table_line(report))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
