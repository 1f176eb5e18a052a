"""Training the autoencoder on shapes scenes: reconstruction (MSE) of the posterior mean on whole 128x128 scenes (the
mid-block attention must see the 16x16 latent grid it will run on: crops trained 4x faster but reconstructed whole
scenes 4 dB worse), a small KL term, and noise on the latents the decoder sees (it will decode the transformer's
imperfect latents)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from kontext_trt.core.timing import bar
from kontext_trt.shapes.scenes import EDITS, make_edit, render
from kontext_trt.train.optim import take_step


@dataclass(frozen=True)
class VaeRecipe:
    """How the autoencoder is trained."""

    steps: int = 1400
    batch: int = 8
    lr: float = 1e-3
    kl_weight: float = 1e-6
    latent_noise: float = 0.05  # decoder input noise, relative to the latent's standard deviation
    stats_scenes: int = 256  # scenes the latent shift/scale and the reconstruction PSNR are measured on


def scene_batch(rng: random.Random, count: int) -> torch.Tensor:
    """(count, 3, 128, 128) scenes in [-1, 1]: inputs and targets of random edits, as the pipeline will see them."""
    images = []
    for _ in range(count):
        edit = make_edit(rng, rng.choice(EDITS))
        shapes = edit.target if edit.source is None or rng.random() < 0.5 else edit.source
        images.append(np.asarray(render(shapes), dtype=np.float32))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae: nn.Module, recipe: VaeRecipe, seed: int, losses: list[float], log: Callable[[str], None]) -> None:
    """Train `vae` (diffusers AutoencoderKL, fp32) in place; appends each step's reconstruction loss to `losses` and
    logs the mean of every 100."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 *
                                              (1 + math.cos(math.pi * s / recipe.steps)))
    vae.train()
    steps = bar(range(recipe.steps), "training the VAE", unit="step")
    for step in steps:
        x = scene_batch(rng, recipe.batch)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        z_in = z + recipe.latent_noise * z.detach().std() * torch.randn_like(z)
        recon = vae.decode(z_in).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        take_step(mse + recipe.kl_weight * kl, params, opt, sched)
        losses.append(mse.item())
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"vae step {step + 1}/{recipe.steps}: mse {np.mean(losses[-100:]):.5f}")
    vae.eval()


@torch.no_grad()
def latent_stats(vae: nn.Module, seed: int, count: int = 256) -> tuple[float, float, float]:
    """(shift, scale, psnr): the latent mean and 1/std over `count` scenes (vae/config.json's shift_factor and
    scaling_factor) and the reconstruction PSNR in dB of those scenes in uint8."""
    x = scene_batch(random.Random(seed), count)
    means, errors = [], []
    for chunk in x.split(32):
        z = vae.encode(chunk).latent_dist.mean
        recon = vae.decode(z).sample.clamp(-1, 1)
        means.append(z)
        errors.append((((recon + 1) * 127.5).round() - ((chunk + 1) * 127.5).round()).pow(2).mean(dim=(1, 2, 3)))
    z = torch.cat(means)
    mse = torch.cat(errors).mean().item()
    return z.mean().item(), 1.0 / z.std().item(), 10 * math.log10(255.0**2 / max(mse, 1e-12))
