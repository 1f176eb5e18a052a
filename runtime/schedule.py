"""The rectified-flow schedule: resolution-dependent shift mu and the shifted sigmas."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ShiftConfig:
    """Linear map from target-token count to mu (the scheduler_config.json fields)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


def shift_mu(n_tokens: int, cfg: ShiftConfig = ShiftConfig()) -> float:
    """mu, linear in the number of target tokens: base_shift at base_seq_len, max_shift at max_seq_len."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    return n_tokens * slope + (cfg.base_shift - slope * cfg.base_seq_len)


def flow_schedule(steps: int, n_tokens: int, cfg: ShiftConfig = ShiftConfig()) -> torch.Tensor:
    """(steps + 1,) float32 sigmas: linspace(1, 1/steps) shifted by e^mu / (e^mu + 1/s - 1), then a final 0."""
    sigmas = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
    e_mu = torch.tensor(math.exp(shift_mu(n_tokens, cfg)), dtype=torch.float32)
    shifted = e_mu / (e_mu + (torch.ones(()) / sigmas - 1.0))
    return torch.cat([shifted, torch.zeros(1)])
