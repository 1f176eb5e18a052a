"""The optimizer step both trainings take (VAE and transformer), and the moving average of the weights a run may
end with."""
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


class MovingAverage:
    """The exponential moving average of params over the optimizer's steps: after each step `update()`; at the end
    `copy_to_params()` leaves the averaged weights in params. decay 0 keeps no copy and changes nothing."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params] if decay else []

    @torch.no_grad()
    def update(self) -> None:
        for a, p in zip(self.average, self.params):
            a.lerp_(p, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, a in zip(self.params, self.average):
            p.copy_(a)
