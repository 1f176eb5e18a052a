"""The rectified-flow schedule: resolution-dependent shift mu and the shifted sigmas."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kontext_trt.core.flux_constants import SCHEDULER_CONFIG


@dataclass(frozen=True)
class ShiftConfig:
    """Linear map from target-token count to mu (the scheduler_config.json fields; defaults: the real snapshot's)."""

    base_seq_len: int = SCHEDULER_CONFIG["base_image_seq_len"]
    max_seq_len: int = SCHEDULER_CONFIG["max_image_seq_len"]
    base_shift: float = SCHEDULER_CONFIG["base_shift"]
    max_shift: float = SCHEDULER_CONFIG["max_shift"]

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "ShiftConfig":
        """The shift line of a scheduler_config.json, the snapshot's values for fields it lacks."""
        return cls(config.get("base_image_seq_len", cls.base_seq_len), config.get("max_image_seq_len", cls.max_seq_len),
                   config.get("base_shift", cls.base_shift), config.get("max_shift", cls.max_shift))


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
