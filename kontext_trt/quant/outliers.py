"""SVDQuant vs plain NVFP4 vs FP8 on weights with outliers: what the README's quantization figures come from.

Real FLUX weights are not available here, so a synthetic checkpoint (tiny or slim preset: real widths) gets a
heavy-tailed outlier pattern injected into a few input channels of every block linear that NVFP4 quantizes: those
columns are scaled by 1 + 10 |t| (t Student-t, 2 degrees of freedom: median x9, tail capped at x100), the way a few
input channels of real DiT weights and activations carry most of the magnitude.

    python -m kontext_trt.quant.outliers --preset tiny --out DIR [--e2e] [--ranks 0,16,32]

writes DIR/outliers.json and prints two tables: per-layer output error (relative L2 against the bf16 layer in
float64, on Gaussian inputs) of FP8, plain NVFP4 and SVDQuant per rank, and, with --e2e, the quality report of a full
`kontext-trt quantize` (without its ONNX export) of the outlier checkpoint per rank and for FP8.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kontext_trt.quant import recipe as rc
from kontext_trt.quant import svdquant
from kontext_trt.quant.qmodel import QuantLinear

BLOCK_LINEAR = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|"
                          r"add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|"
                          r"proj_out)\.weight")


def outlier_factors(k: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """(K,) column factors: 1 except `channels` random columns scaled by 1 + 10 |t_2| (at most 100)."""
    factors = torch.ones(k)
    t = torch.distributions.StudentT(2.0).sample((channels,)) if channels else torch.zeros(0)
    factors[torch.randperm(k, generator=generator)[:channels]] = (1 + 10 * t.abs()).clamp(max=100)
    return factors


def inject_outliers(src: Path, dst: Path, channels: int, seed: int = 0) -> Path:
    """A copy of diffusers-layout checkpoint `src` at `dst` (other files hard-linked) whose block linears carry
    outlier input channels; written to a temp folder, then renamed."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=os.link)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT samples from torch's global generator
    for shard in sorted((tmp / "transformer").glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, w in tensors.items():
            if BLOCK_LINEAR.fullmatch(name):
                f = outlier_factors(w.shape[1], channels, generator)
                tensors[name] = (w.float() * f).to(w.dtype)
        shard.unlink()  # a hard link: never write through it
        save_file(tensors, str(shard))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def layer_errors(ckpt_path: Path, ranks: list[int], rows: int = 256, limit: int | None = None) -> list[dict]:
    """Per NVFP4 layer of the checkpoint's transformer: relative L2 output error of FP8, NVFP4 (rank 0) and SVDQuant
    (each rank > 0, alpha searched as in calibration) against the bf16 weights, on N(0, 1) inputs."""
    from kontext_trt.core import checkpoint as ck
    model = ck.load_transformer(ck.open_checkpoint(ckpt_path), torch.bfloat16)
    recipe = rc.make_recipe(model, "nvfp4", "fp8")
    modules = dict(model.named_modules())
    names = [n for n, f in recipe.layers.items() if f == "nvfp4"][:limit]
    generator = torch.Generator().manual_seed(0)
    results = []
    for name in names:
        start = time.monotonic()
        linear = modules[name].float()
        x = torch.randn(rows, linear.in_features, generator=generator)
        ref = (x.double() @ linear.weight.double().T)
        amax = x.abs().max()

        bias = 0 if linear.bias is None else linear.bias.double()

        def error(layer: torch.nn.Module) -> float:
            with torch.no_grad():
                return float(((layer(x).double() - bias - ref).norm() / ref.norm()))

        row = {"layer": name, "in": linear.in_features, "out": linear.out_features,
               "fp8": error(QuantLinear(linear, "fp8", amax, torch.float32))}
        act_mean, w = x.abs().mean(0), linear.weight.detach().float()
        alpha = svdquant.search_alpha(w, x, act_mean)
        s = svdquant.smoothing(act_mean, svdquant.weight_scale(w), alpha)
        for rank in ranks:
            layer = QuantLinear(linear, "nvfp4", amax, torch.float32) if rank == 0 else \
                QuantLinear(linear, "nvfp4", (x.abs().amax(0) / s).max(), torch.float32, s, rank)
            row[f"nvfp4_r{rank}"] = error(layer)
        row |= {"alpha": alpha, "seconds": time.monotonic() - start}
        results.append(row)
    return results


def end_to_end(ckpt_path: Path, out: Path, ranks: list[int], calib_size: int, steps: int, report_size: int) -> dict:
    """The quality report (summary and per step) of fp8 and of nvfp4 at each rank, quantize's quick CPU settings."""
    from kontext_trt.quant.quantize import QuantizeRequest, quantize

    runs = {"fp8": {"precision": "fp8"}} | {f"nvfp4_r{r}": {"precision": "nvfp4", "svd_rank": r} for r in ranks}
    reports = {}
    for label, settings in runs.items():
        start = time.monotonic()
        report = quantize(QuantizeRequest(model=ckpt_path, out=out / label, calib_size=calib_size, calib_steps=steps,
                                          report_size=report_size, auto_resize=False, export=False, **settings))
        reports[label] = {"summary": report["summary"], "per_step": report["per_step"],
                          "svdquant": report["svdquant"], "seconds": time.monotonic() - start}
    return reports


def markdown(layers: list[dict], e2e: dict | None, ranks: list[int]) -> str:
    """The per-layer table and, when measured, the end-to-end table."""
    cols = ["fp8"] + [f"nvfp4_r{r}" for r in ranks]
    lines = ["| layer | in x out | " + " | ".join(cols) + " | alpha |", "|---|---|" + "---|" * (len(cols) + 1)]
    lines += [f"| {r['layer']} | {r['in']}x{r['out']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) +
              f" | {r['alpha']:.1f} |" for r in layers]
    mean = {c: sum(r[c] for r in layers) / max(len(layers), 1) for c in cols}
    lines.append("| mean | | " + " | ".join(f"{mean[c]:.4f}" for c in cols) + " | |")
    if e2e:
        lines += ["", "| quantization | worst step cosine | worst step rel. error | PSNR dB | SSIM | branch FLOP/token |",
                  "|---|---|---|---|---|---|"]
        for label, r in e2e.items():
            s, svd = r["summary"], r["svdquant"]
            lines.append(f"| {label} | {s['cosine_min']:.5f} | {s['rel_error_max']:.4f} | {s['psnr_mean_db']:.2f} | "
                         f"{s['ssim_mean']:.4f} | {svd['branch_flop_per_token'] if svd else 0:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="synthetic preset: tiny or slim")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ranks", default="0,16,32")
    parser.add_argument("--channels", type=int, help="outlier input channels per layer (default: 2 tiny, 8 slim)")
    parser.add_argument("--layers", type=int, help="measure only the first N NVFP4 layers")
    parser.add_argument("--e2e", action="store_true", help="also the end-to-end quality reports")
    parser.add_argument("--calib-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--report-size", type=int, default=1)
    args = parser.parse_args(argv)
    from kontext_trt.synth import write_synthetic_checkpoint

    ranks = [int(r) for r in args.ranks.split(",")]
    channels = args.channels if args.channels is not None else {"tiny": 2}.get(args.preset, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    plain = args.out / f"{args.preset}"
    if not plain.is_dir():
        write_synthetic_checkpoint(plain, preset=args.preset)
    ckpt = inject_outliers(plain, args.out / f"{args.preset}_outliers", channels)
    layers = layer_errors(ckpt, ranks, limit=args.layers)
    e2e = end_to_end(ckpt, args.out / "runs", ranks, args.calib_size, args.steps, args.report_size) if args.e2e \
        else None
    result = {"preset": args.preset, "outlier_channels": channels, "layers": layers, "end_to_end": e2e}
    (args.out / "outliers.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(layers, e2e, ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
