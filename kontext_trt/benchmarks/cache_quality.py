"""How far a step-cached edit is from the uncached edit of the same request and seed: per-step cosine of the
transformer's prediction, and PSNR/SSIM of the final images (quant/report.py's image metrics, one source).

Per step, each edit is on its own trajectory, so the cosine at step i measures the reused residual and the drift it
caused so far: the prediction of the target tokens (velocity), batch items flattened, cosine per item, worst item.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from kontext_trt.core.specs import CacheSpec
from kontext_trt.quant.report import image_metrics
from kontext_trt.runtime.flow import EditRequest, EditResult, Kontext, edit


class Recorder:
    """A stage that passes calls through and keeps each output's `latent` (float32, on the CPU)."""

    def __init__(self, stage) -> None:
        self.stage, self.latents = stage, []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.stage(**inputs)
        self.latents.append(out["latent"].float().cpu())
        return out


def recorded_edit(k: Kontext, req: EditRequest, stage: str) -> tuple[EditResult, list[torch.Tensor]]:
    """The edit's result and the `latent` output of each call of `stage` (one per step without true CFG)."""
    original = k.stages[stage]
    k.stages[stage] = recorder = Recorder(original)
    try:
        return edit(k, req), recorder.latents
    finally:
        k.stages[stage] = original


def cache_quality(k: Kontext, req: EditRequest) -> dict:
    """Cached (req.cache) against uncached, same seed: per-step cosine of the target tokens' prediction (worst batch
    item), its minimum, and mean PSNR (dB; null: identical images) / SSIM over the batch's images. The true-CFG
    pass, if any, is left out (one prediction per step)."""
    plain = replace(req, negative_prompt=None, true_cfg=1.0)
    single = "transformer" if "transformer" in k.stages else "transformer_tail"  # engines built as parts: the parts
    reference, ref = recorded_edit(k, replace(plain, cache=CacheSpec()), single)
    cached, latents = recorded_edit(k, plain, "transformer_tail")
    n = (reference.width // 16) * (reference.height // 16)  # target tokens, first in the joint sequence
    cosines = [torch.nn.functional.cosine_similarity(c[:, :n].flatten(1), r[:, :n].flatten(1), dim=1).min().item()
               for c, r in zip(latents, ref)]
    metrics = [image_metrics(a, b) for a, b in zip(reference.images, cached.images)]
    psnr = float(np.mean([m["psnr_db"] for m in metrics]))
    return {"reference": "off", "cache": cached.metadata["cache"], "cosine_per_step": cosines,
            "cosine_min": min(cosines), "psnr_db": psnr if np.isfinite(psnr) else None,
            "ssim": float(np.mean([m["ssim"] for m in metrics]))}
