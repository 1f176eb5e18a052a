"""SVDQuant (Li et al. 2024) as ModelOpt's `svdquant` algorithm computes it, on the CPU with our NVFP4 emulation.

Per NVFP4 linear y = x W^T (W: (N, K)):
1. Smoothing (ModelOpt's awq_lite statistics): a = mean |x| per input channel over the calibration edits, w = mean over
   rows of |W| / its 16-element block's max, and for a migration strength alpha
       s = clamp(a^alpha / w^(1 - alpha), 1e-4, 1e4),  s /= sqrt(max(s) * min(s)).
   alpha is searched per layer over 0, 0.1, .., 1 (the output error of x W^T against (x / s) nvfp4(W s)^T on sampled
   calibration rows, inputs unquantized, as awq_lite), or fixed by the recipe.
2. Low rank: W s = L1 L2 + R with L1 L2 the rank-r truncated SVD of the smoothed weight (float64), L1 (K, r) and
   L2 (r, N) rounded to the graph dtype (bf16), and R = W s - (L1 L2)^T computed from the ROUNDED factors, so the
   NVFP4 path absorbs the branch's own rounding and the parts add up to W s exactly before quantization.
3. y = (x / s) L1 L2 + nvfp4(x / s) nvfp4(R)^T + b; the input amax of x / s is max_c(amax_c / s_c), exact from the
   per-channel amax collected during calibration.
"""
from __future__ import annotations

import torch
from torch import nn

from kontext_trt.quant import formats

ALPHAS = tuple(i / 10 for i in range(11))  # awq_lite's alpha grid
SAMPLE_ROWS = 256  # calibration rows kept per layer for the alpha search (reservoir over all calls)
SMOOTH_CLAMP = (1e-4, 1e4)


class ActivationStats:
    """Forward pre-hooks on the SVDQuant layers: per input channel mean |x| and amax, and a row reservoir."""

    def __init__(self, seed: int = 0) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}  # rows offered to the reservoir
        self.total_rows: dict[str, int] = {}  # rows in abs_sum
        self.generator = torch.Generator().manual_seed(seed)

    def attach(self, model: nn.Module, names: list[str]) -> list:
        """Register a hook on each named layer; the handles (remove them when done)."""
        modules = dict(model.named_modules())
        return [modules[name].register_forward_pre_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (rows, K)
            a = x.float().abs()
            if name not in self.seen:
                self.abs_sum[name], self.amax[name] = a.sum(0).double(), a.amax(0)
                self.rows[name], self.seen[name], self.total_rows[name] = x[:0].cpu(), 0, 0
            else:
                self.abs_sum[name] += a.sum(0).double()
                self.amax[name] = torch.maximum(self.amax[name], a.amax(0))
            self.total_rows[name] += x.shape[0]
            self._reservoir(name, x)
        return record

    def _reservoir(self, name: str, x: torch.Tensor) -> None:
        """Keep a uniform sample of SAMPLE_ROWS of every row seen (16 candidate rows per call)."""
        pick = torch.randperm(x.shape[0], generator=self.generator)[:16]
        for row in x[pick].cpu():
            self.seen[name] += 1
            if self.rows[name].shape[0] < SAMPLE_ROWS:
                self.rows[name] = torch.cat([self.rows[name], row[None]])
            else:
                j = int(torch.randint(self.seen[name], (), generator=self.generator))
                if j < SAMPLE_ROWS:
                    self.rows[name][j] = row


def weight_scale(w: torch.Tensor, block: int = formats.BLOCK) -> torch.Tensor:
    """Per input channel mean over rows of |W| / the max |W| of its block: (K,) float32 (awq_lite's weight scale)."""
    a = w.float().abs().unflatten(-1, (-1, block))  # (N, K/16, 16)
    return (a / (a.amax(-1, keepdim=True) + torch.finfo(torch.float32).tiny)).flatten(1).mean(0)


def smoothing(act_mean: torch.Tensor, w_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = clamp(a^alpha / w^(1-alpha)), normalized so that max(s) * min(s) = 1: (K,) float32."""
    s = (act_mean.float().pow(alpha) / (w_scale.float().pow(1 - alpha) + torch.finfo(torch.float32).tiny))
    s = s.clamp(*SMOOTH_CLAMP)
    return s / (s.max() * s.min()).sqrt()


def nvfp4_weight_qdq(w: torch.Tensor) -> torch.Tensor:
    """A weight's NVFP4 round trip with its own per-tensor scale (float32)."""
    return formats.nvfp4_qdq(w.float(), formats.scale_for(w.abs().max(), formats.NVFP4_MAX, torch.float32))


def search_alpha(w: torch.Tensor, rows: torch.Tensor, act_mean: torch.Tensor) -> float:
    """The alpha of ALPHAS whose smoothing gives the smallest output MSE of (x/s) nvfp4(W s)^T against x W^T."""
    w, x = w.float(), rows.float()
    ref, ws = x @ w.T, weight_scale(w)
    losses = {}
    for alpha in ALPHAS:
        s = smoothing(act_mean, ws, alpha)
        losses[alpha] = float(((x / s) @ nvfp4_weight_qdq(w * s).T - ref).pow(2).mean())
    return min(losses, key=losses.get)


def smooth_layers(model: nn.Module, names: list[str], stats: ActivationStats,
                  alpha: float | None) -> dict[str, torch.Tensor]:
    """'<layer>.smooth' (K,) s, '<layer>.alpha' and '<layer>.input' (amax of x / s) for every SVDQuant layer."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        w = modules[name].weight.detach().float()
        act_mean = (stats.abs_sum[name] / stats.total_rows[name]).float()
        chosen = search_alpha(w, stats.rows[name], act_mean) if alpha is None else alpha
        s = smoothing(act_mean, weight_scale(w), chosen)
        out[f"{name}.smooth"] = s
        out[f"{name}.alpha"] = torch.tensor(chosen, dtype=torch.float32)
        out[f"{name}.input"] = (stats.amax[name] / s).max().reshape(())
    return out


def split(w: torch.Tensor, s: torch.Tensor, rank: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K), smoothing s (K,) -> (x multiplier 1/s (K,) in dtype, L1 (K, r) and L2 (r, N) in dtype, residual
    R (N, K) float32) with W diag(s_eff) = (L1 L2)^T + R, s_eff = 1 / (1/s rounded to dtype)."""
    inv_s = (1 / s.float()).to(dtype)  # what multiplies x in the graph
    smoothed = w.double() / inv_s.double()  # (N, K): W diag(s_eff)
    u, sigma, vt = torch.linalg.svd(smoothed, full_matrices=False)
    rank = min(rank, sigma.numel())
    l1 = vt[:rank].T.to(dtype)  # (K, r)
    l2 = (u[:, :rank] * sigma[:rank]).T.to(dtype)  # (r, N)
    residual = smoothed - (l1.double() @ l2.double()).T
    return inv_s, l1, l2, residual.float()


def branch_summary(model: nn.Module, names: list[str], rank: int, amax: dict[str, torch.Tensor]) -> dict:
    """The low-rank branches' size and cost: parameters r (K + N) (bf16 bytes), FLOP 2 r (K + N) per token, summed
    over layers (a layer is called once per token of its stream), the NVFP4 weight bytes they sit beside (the
    branches' share of the engine's weights), and the chosen alphas."""
    modules = dict(model.named_modules())
    widths = [(modules[n].in_features, modules[n].out_features) for n in names]
    ranks = [min(rank, k, n) for k, n in widths]
    alphas = [float(amax[f"{n}.alpha"]) for n in names if f"{n}.alpha" in amax]
    params = sum(r * (k + n) for r, (k, n) in zip(ranks, widths))
    return {"rank": rank, "layers": len(names), "branch_params": params, "branch_bytes": 2 * params,
            "nvfp4_weight_bytes": sum(n * k // 2 + n * k // formats.BLOCK for k, n in widths),  # E2M1 + E4M3 scales
            "branch_flop_per_token": sum(2 * r * (k + n) for r, (k, n) in zip(ranks, widths)),
            "alpha_mean": sum(alphas) / len(alphas) if alphas else None,
            "alpha_min": min(alphas, default=None), "alpha_max": max(alphas, default=None)}
