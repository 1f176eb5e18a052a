"""Training the transformer with the rectified-flow objective exactly as the runtime samples it.

x_t = (1 - s) x0 + s noise over the packed target latent, s drawn from the runtime's shifted schedule (flow_schedule's
shift of a uniform u for the target's token count); the context image's packed latent is appended with index-1 ids;
the transformer (runtime.torch_stages.TransformerModule, the stage the loop calls) is asked for noise - x0 on the
target tokens, given the T5 states, CLIP pooled vector, timestep s and a guidance value.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from kontext_trt.core.timing import bar
from kontext_trt.runtime.latents import latent_ids, pack_latents, text_ids
from kontext_trt.runtime.schedule import ShiftConfig, shift_mu
from kontext_trt.shapes.scenes import EDITS, Edit, make_edit, render
from kontext_trt.train.optim import MovingAverage, take_step


@dataclass(frozen=True)
class FlowRecipe:
    """How the transformer is trained."""

    edits: int = 10000  # distinct training edits, encoded once
    steps: int = 5000
    batch: int = 32
    lr: float = 6e-4
    guidance: tuple[float, float] = (1.0, 5.0)  # guidance values drawn uniformly: the model learns to ignore it
    warmup: int = 200
    train_text: bool = False  # also train the text encoders (their outputs for the 57 prompts, every step)
    edit_weight: float = 1.0  # loss weight of the target tokens an edit changes (1: every token alike)
    ema: float = 0.0  # decay of the weights' exponential moving average the run ends with (0: the last step's)


# A target token counts as changed by its edit when its packed latent differs from the context's by more than this
# mean square (latents have unit variance; an edited shape's tokens differ by 0.3 to 7, untouched ones by < 0.05).
CHANGED_TOKEN_MSE = 0.1


@dataclass
class EncodedEdits:
    """The training set in latent space: packed target and context latents (zeros for text-to-image edits), the
    prompt index of each edit and whether it has a context image."""

    target: torch.Tensor  # (E, N, 64)
    context: torch.Tensor  # (E, N, 64)
    prompt: torch.Tensor  # (E,) int64 into the prompt table
    has_context: torch.Tensor  # (E,) bool


def pixels(shapes) -> torch.Tensor:
    """(3, 128, 128) in [-1, 1], as runtime's image_to_tensor gives."""
    return torch.from_numpy(np.asarray(render(shapes), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_edits(edits: list[Edit], prompts: list[str], encode: Callable[[torch.Tensor], torch.Tensor],
                 chunk: int = 64) -> EncodedEdits:
    """Encode every edit's images with `encode` ((B, 3, H, W) -> scaled, shifted (B, 16, h, w)) and pack them."""
    index = {p: i for i, p in enumerate(prompts)}
    targets, contexts = [], []
    for start in bar(range(0, len(edits), chunk), "encoding the training edits", unit="batch"):
        part = edits[start:start + chunk]
        targets.append(pack_latents(encode(torch.stack([pixels(e.target) for e in part]))))
        ctx = torch.zeros_like(targets[-1])
        has = [i for i, e in enumerate(part) if e.source is not None]
        if has:
            ctx[has] = pack_latents(encode(torch.stack([pixels(part[i].source) for i in has])))
        contexts.append(ctx)
    return EncodedEdits(torch.cat(targets), torch.cat(contexts), torch.tensor([index[e.prompt] for e in edits]),
                        torch.tensor([e.source is not None for e in edits]))


def training_edits(count: int, seed: int) -> list[Edit]:
    """`count` edits, the four kinds in turn, from seed `seed` (below the held-out range)."""
    rng = random.Random(seed)
    return [make_edit(rng, EDITS[i % len(EDITS)]) for i in range(count)]


def shifted_sigmas(u: torch.Tensor, n_tokens: int, shift: ShiftConfig) -> torch.Tensor:
    """The runtime's schedule shift applied to u in (0, 1]: e^mu / (e^mu + 1/u - 1)."""
    e_mu = math.exp(shift_mu(n_tokens, shift))
    return e_mu / (e_mu + 1.0 / u - 1.0)


def token_weights(target: torch.Tensor, context: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """(B, N) loss weights: edit_weight on the target tokens the edit changes (CHANGED_TOKEN_MSE), 1 elsewhere.
    The rectified-flow objective stays the runtime's; the weight only says where its error counts more."""
    changed = (target - context).pow(2).mean(-1) > CHANGED_TOKEN_MSE
    return 1.0 + (edit_weight - 1.0) * changed.float()


def train_transformer(model: nn.Module, data: EncodedEdits, prompt_table: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                      text_params: list[nn.Parameter], recipe: FlowRecipe, shift: ShiftConfig, seed: int,
                      losses: list[float], log: Callable[[str], None]) -> None:
    """Train `model` (TransformerModule, fp32) in place. prompt_table() gives the text encoders' outputs for the
    prompt table, T5 states (P, L, Dt) and CLIP pooled (P, Dc); with recipe.train_text, text_params (the encoders')
    train too. A batch holds only edits with a context image or only text-to-image ones."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = data.target.shape[1]
    side = int(math.isqrt(n)) * 2  # latent side: packed tokens are 2x2 patches
    ids_target, ids_context = latent_ids(side, side, 0), latent_ids(side, side, 1)
    with torch.no_grad():
        txt_ids = text_ids(prompt_table()[0].shape[1])
    with_ctx, without = torch.nonzero(data.has_context).squeeze(1), torch.nonzero(~data.has_context).squeeze(1)
    params = [*model.parameters(), *(text_params if recipe.train_text else [])]
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / recipe.steps)))))
    average = MovingAverage(params, recipe.ema)
    model.train()
    for step in bar(range(recipe.steps), "training the transformer", unit="step"):
        pool = without if step % len(EDITS) == len(EDITS) - 1 else with_ctx
        pick = pool[torch.randint(len(pool), (recipe.batch,), generator=gen)]
        x0 = data.target[pick]
        noise = torch.randn(x0.shape, generator=gen)
        s = shifted_sigmas(torch.rand(recipe.batch, generator=gen).clamp_min(1e-3), n, shift)
        xt = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise
        context = pool is with_ctx
        hidden = torch.cat([xt, data.context[pick]], dim=1) if context else xt
        ids = torch.cat([ids_target, ids_context]) if context else ids_target
        lo, hi = recipe.guidance
        guidance = lo + (hi - lo) * torch.rand(recipe.batch, generator=gen)
        with torch.set_grad_enabled(recipe.train_text):
            text, pooled = prompt_table()
        out = model(hidden_states=hidden, encoder_hidden_states=text[data.prompt[pick]],
                    pooled_projections=pooled[data.prompt[pick]], timestep=s, img_ids=ids, txt_ids=txt_ids,
                    guidance=guidance)[0][:, :n]
        weight = token_weights(x0, data.context[pick], recipe.edit_weight if context else 1.0)
        loss = ((out - (noise - x0)).pow(2).mean(-1) * weight).sum() / weight.sum()
        take_step(loss, params, opt, sched)
        average.update()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"transformer step {step + 1}/{recipe.steps}: loss {np.mean(losses[-100:]):.4f}")
    average.copy_to_params()
    if recipe.ema:
        log(f"transformer: the weights are the moving average of the steps' (decay {recipe.ema})")
    model.eval()
