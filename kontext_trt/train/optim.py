"""The optimizer step both trainings take (VAE and transformer)."""
from __future__ import annotations

import torch


def take_step(loss: torch.Tensor, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backpropagate loss, clip the gradients of params to norm 1, step the optimizer and the schedule."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
