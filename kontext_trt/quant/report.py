"""The quality report: a quantized transformer against the bf16 one, on the same inputs and seeds.

- Per step: both transformers are called on the SAME inputs, those of the bf16 trajectory, so each step measures the
  quantization error of one call (not the drift of the loop): cosine similarity and relative L2 error
  ||q - r|| / ||r|| of the prediction (the target tokens of the output), mean and worst over the samples.
- Per image: the full quantized edit (its own trajectory) against the bf16 edit: PSNR (dB, data range 1) and SSIM
  (torchmetrics, 11x11 Gaussian window) of the final images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kontext_trt.core.files import write_atomic, write_json
from kontext_trt.core.timing import progress
from kontext_trt.quant.calib_data import Pair
from kontext_trt.runtime import flow

REPORT_JSON, REPORT_MD = "report.json", "report.md"


class PairedStage:
    """A transformer stage that answers with the reference and records how far the quantized one is, per call."""

    def __init__(self, reference, quantized) -> None:
        self.reference, self.quantized = reference, quantized
        self.steps: list[dict] = []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        ref = self.reference(**inputs)
        target = inputs["img_ids"][:, 0] == 0  # index 0: target tokens; 1: context tokens
        r = ref["latent"][:, target].float().flatten(1)
        q = self.quantized(**inputs)["latent"][:, target].float().flatten(1)
        self.steps.append({"sigma": float(inputs["timestep"][0]),
                           "cosine": torch.nn.functional.cosine_similarity(q, r, dim=1).min().item(),
                           "rel_error": ((q - r).norm(dim=1) / r.norm(dim=1)).max().item()})
        return ref


def image_metrics(reference, quantized) -> dict:
    """PSNR (dB) and SSIM of two PIL images of the same size, pixels in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    r, q = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)
            for img in (reference, quantized))
    return {"psnr_db": float(peak_signal_noise_ratio(q, r, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(q, r, data_range=1.0))}


def quality_report(k: flow.Kontext, quantized, pairs: list[Pair], steps: int, auto_resize: bool, info: dict) -> dict:
    """Edit each pair (seed = its index) with the bf16 transformer (k's) and the quantized stage; the report dict."""
    reference, on_quantized = k.stages["transformer"], k.with_stages(transformer=quantized)
    samples = []
    for i, pair in enumerate(pairs):
        request = flow.EditRequest(prompts=[pair.prompt], image=pair.image, steps=steps, seed=i,
                                   auto_resize=auto_resize)
        with progress(f"report {i + 1}/{len(pairs)}: {pair.prompt!r} on {pair.source}, bf16 and quantized"):
            paired = PairedStage(reference, quantized)
            ref_image = flow.edit(k.with_stages(transformer=paired), request).images[0]
            q_image = flow.edit(on_quantized, request).images[0]
        samples.append({"prompt": pair.prompt, "source": pair.source, "seed": i, "steps": paired.steps,
                        **image_metrics(ref_image, q_image)})
    return {**info, "reference": "bf16 transformer", "samples": samples, "per_step": per_step(samples),
            "summary": summary(samples)}


def per_step(samples: list[dict]) -> list[dict]:
    """Step i over all samples: sigma, mean and worst cosine, mean and worst relative error."""
    rows = []
    for i in range(min(len(s["steps"]) for s in samples)):
        cos = [s["steps"][i]["cosine"] for s in samples]
        err = [s["steps"][i]["rel_error"] for s in samples]
        rows.append({"step": i, "sigma": samples[0]["steps"][i]["sigma"], "cosine_mean": float(np.mean(cos)),
                     "cosine_min": min(cos), "rel_error_mean": float(np.mean(err)), "rel_error_max": max(err)})
    return rows


def summary(samples: list[dict]) -> dict:
    """Worst per-step cosine and relative error, mean and worst PSNR and SSIM."""
    steps = [step for s in samples for step in s["steps"]]
    return {"cosine_min": min(s["cosine"] for s in steps), "rel_error_max": max(s["rel_error"] for s in steps),
            "psnr_mean_db": float(np.mean([s["psnr_db"] for s in samples])),
            "psnr_min_db": min(s["psnr_db"] for s in samples),
            "ssim_mean": float(np.mean([s["ssim"] for s in samples])), "ssim_min": min(s["ssim"] for s in samples)}


def markdown(report: dict) -> str:
    """The report as Markdown: settings, summary, per-step table, per-image table."""
    s = report["summary"]
    lines = [f"# Quantization report: {report['precision']} (attention {report['attention']}) vs bf16", "",
             f"{len(report['samples'])} edits, {report['per_step'][-1]['step'] + 1} steps, "
             f"{report['quantized_layers']} of {report['linear_layers']} linear layers quantized, calibrated on "
             f"{report['calibration']}.", "",
             "| metric | value |", "|---|---|",
             f"| worst step cosine similarity | {s['cosine_min']:.5f} |",
             f"| worst step relative error | {s['rel_error_max']:.4f} |",
             f"| PSNR mean / min | {s['psnr_mean_db']:.2f} / {s['psnr_min_db']:.2f} dB |",
             f"| SSIM mean / min | {s['ssim_mean']:.4f} / {s['ssim_min']:.4f} |", "", *svd_lines(report),
             *narrowed_lines(report),
             "| step | sigma | cosine mean | cosine min | rel. error mean | rel. error max |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['sigma']:.4f} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
              f"{r['rel_error_mean']:.4f} | {r['rel_error_max']:.4f} |" for r in report["per_step"]]
    lines += ["", "| edit | input | PSNR dB | SSIM |", "|---|---|---|---|"]
    lines += [f"| {x['prompt']} | {x['source']} | {x['psnr_db']:.2f} | {x['ssim']:.4f} |" for x in report["samples"]]
    return "\n".join(lines) + "\n"


def svd_lines(report: dict) -> list[str]:
    """SVDQuant: rank, layers, alphas, the branch's parameters and FLOP per token (none for plain NVFP4 / FP8)."""
    svd = report.get("svdquant")
    if not svd:
        return []
    alpha = "n/a" if svd["alpha_mean"] is None else \
        f"{svd['alpha_mean']:.2f} (min {svd['alpha_min']:.1f}, max {svd['alpha_max']:.1f})"
    return [f"SVDQuant rank {svd['rank']} on {svd['layers']} NVFP4 layers, smoothing alpha {alpha}; the bf16 low-rank "
            f"branches hold {svd['branch_params']:,} parameters ({svd['branch_bytes'] / 2**20:.2f} MiB beside "
            f"{svd['nvfp4_weight_bytes'] / 2**20:.2f} MiB of NVFP4 weights) and cost {svd['branch_flop_per_token']:,} "
            "FLOP per token (2 r (d_in + d_out) per layer). The smoothing is an explicit Mul before each layer's FP4 "
            "quantizer (q, k, v share their input but not their smoothing, so it cannot fold into the norm).", ""]


def narrowed_lines(report: dict) -> list[str]:
    """The layers kept below the requested format, with why."""
    narrowed = report.get("narrowed") or {}
    if not narrowed:
        return []
    return ["| layer kept in a lower precision | why |", "|---|---|",
            *(f"| {name} | {why} |" for name, why in narrowed.items()), ""]


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """DIR/report.json and DIR/report.md, each written atomically."""
    out = Path(out)
    js = write_json(out / REPORT_JSON, report, indent=2)
    md = write_atomic(out / REPORT_MD, markdown(report))
    return js, md
