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
    # FLUX.2 [klein]'s schedule reads these too (FLUX.1 Kontext's always shifts by its mu line, as BFL's does)
    dynamic: bool = SCHEDULER_CONFIG["use_dynamic_shifting"]  # shift by mu; False: by the static `static_shift`
    static_shift: float = SCHEDULER_CONFIG["shift"]
    time_shift_type: str = SCHEDULER_CONFIG["time_shift_type"]  # exponential or linear

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "ShiftConfig":
        """The shift line of a scheduler_config.json, the snapshot's values for fields it lacks."""
        return cls(config.get("base_image_seq_len", cls.base_seq_len), config.get("max_image_seq_len", cls.max_seq_len),
                   config.get("base_shift", cls.base_shift), config.get("max_shift", cls.max_shift),
                   bool(config.get("use_dynamic_shifting", cls.dynamic)), config.get("shift", cls.static_shift),
                   config.get("time_shift_type", cls.time_shift_type))


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


def empirical_mu(n_tokens: int, steps: int) -> float:
    """FLUX.2's mu: fitted on the number of target tokens and steps (diffusers' compute_empirical_mu, same numbers)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if n_tokens > 4300:
        return float(a2 * n_tokens + b2)
    m_200, m_10 = a2 * n_tokens + b2, a1 * n_tokens + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + (m_200 - 200.0 * a))


def klein_schedule(steps: int, n_tokens: int, cfg: ShiftConfig = ShiftConfig()) -> torch.Tensor:
    """(steps + 1,) float32 sigmas of FLUX.2 [klein]: linspace(1, 1/steps) in float32, shifted with the empirical mu
    (exponential: e^mu / (e^mu + 1/s - 1); linear: mu / (mu + 1/s - 1)), or by the static shift when the scheduler
    does not shift dynamically; then a final 0. The arithmetic is the scheduler's, in numpy float32."""
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if cfg.dynamic:
        mu = empirical_mu(n_tokens, steps)
        scale = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
        sigmas = scale / (scale + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.static_shift * sigmas / (1 + (cfg.static_shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(np.asarray(sigmas)).to(torch.float32), torch.zeros(1)])
