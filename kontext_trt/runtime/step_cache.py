"""Step caching over the split transformer: a policy decides, each step, whether the body runs or its cached residual
is reused. The flow loop (runtime/flow.py) calls StepCache.velocity in place of the transformer stage.

A step runs transformer_head (embedders + first double block), asks the policy, then either runs transformer_body
and caches its residual (final hidden states - block-0 hidden states), or adds the cached residual to this step's
block-0 output; transformer_tail makes the velocity. The residual stays on the stage's device in its dtype.

Policies (thresholds on the relative L1 change mean|a - b| / mean|b|, in float32):
- fbcache:T (First-Block Cache, ParaAttention): the first block's residual against the one of the last computed
  step; reuse while the change is below T. FLUX default 0.12 (ParaAttention's published figure).
- teacache:T (TeaCache4FLUX): the first block's timestep-modulated input against the previous step's, rescaled by a
  polynomial (TeaCache's published FLUX coefficients by default) and accumulated; compute and reset once the sum
  reaches T. FLUX figures published: 0.25 (~1.5x), 0.4 (~1.8x), 0.6 (~2x). Unlike TeaCache's single-graph form,
  a reused step still runs the first block (the head): 1 of FLUX's 57 blocks.
The first `warmup` and last `cooldown` steps are always computed (default 1 each), so T = 0 computes every step
and gives the uncached result. The policy decides on the first prompt pass of a step; a true-CFG negative pass
follows the same decision with its own cached residual. Deciding reads one scalar on the host per step.

Spec grammar (CLI --cache, EditRequest.cache): off | fbcache[:T] | teacache[:T], then optional
,warmup=N ,cooldown=N ,coefficients=c4/c3/c2/c1/c0 (highest power first), e.g. teacache:0.4,warmup=2.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.stages import TRANSFORMER_PARTS

if TYPE_CHECKING:
    from kontext_trt.runtime.flow import Kontext

def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean|now - before| / mean|before|, in float32, read on the host."""
    now, before = now.float(), before.float()
    return ((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12)).item()


class Policy(Protocol):
    """Decides, from the head's outputs, whether this step runs the body; `protected` steps always do."""

    def decide(self, head: dict[str, torch.Tensor], protected: bool) -> bool: ...


class FirstBlockCache:
    """Compute when the first block's residual moved by at least T against the last computed step's."""

    def __init__(self, threshold: float) -> None:
        self.threshold, self.reference = threshold, None

    def decide(self, head: dict[str, torch.Tensor], protected: bool) -> bool:
        residual = head["first_block_residual"]
        compute = protected or self.reference is None or relative_l1(residual, self.reference) >= self.threshold
        if compute:
            self.reference = residual
        return compute


class TeaCache:
    """Compute when the accumulated, rescaled change of the first block's modulated input reaches T."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        self.threshold, self.rescale = threshold, np.poly1d(coefficients)
        self.previous, self.accumulated = None, 0.0

    def decide(self, head: dict[str, torch.Tensor], protected: bool) -> bool:
        modulated = head["modulated_input"]
        if protected or self.previous is None:
            compute = True
        else:
            self.accumulated += max(0.0, float(self.rescale(relative_l1(modulated, self.previous))))
            compute = self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        self.previous = modulated
        return compute


class ComputeAll:
    """off on a pipeline that has only the split transformer (e.g. engines built as parts): every step computed."""

    def decide(self, head: dict[str, torch.Tensor], protected: bool) -> bool:
        return True


def make_policy(spec: CacheSpec) -> Policy:
    """The policy object of a spec (fresh state)."""
    if spec.policy == "off":
        return ComputeAll()
    if spec.policy == "fbcache":
        return FirstBlockCache(spec.threshold)
    return TeaCache(spec.threshold, spec.coefficients)


class StepCache:
    """One edit's step cache: the policy's state, a cached residual per prompt pass, and the step counts."""

    def __init__(self, spec: CacheSpec, steps: int) -> None:
        self.spec, self.steps, self.policy = spec, steps, make_policy(spec)
        self.residuals: dict[int, torch.Tensor] = {}
        self.computed = self.skipped = 0
        self.compute = True

    def protected(self, step: int) -> bool:
        """The warm-up and cool-down steps, always computed."""
        return step < self.spec.warmup or step >= self.steps - self.spec.cooldown

    def velocity(self, k: Kontext, step: int, branch: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's output (B, N+M, 64) at this step for prompt pass `branch` (0: the prompt, 1: the true-CFG
        negative), from head + body + tail, or head + cached residual + tail; timed as the transformer step too."""
        with k.times("transformer", k.device):
            return self._velocity(k, step, branch, inputs)

    def _velocity(self, k: Kontext, step: int, branch: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        head = k.run("transformer_head", **inputs)
        if branch == 0:
            self.compute = self.policy.decide(head, self.protected(step))
            self.computed += self.compute
            self.skipped += not self.compute
        block = head["block_hidden_states"]
        if self.compute or branch not in self.residuals:
            final = k.run("transformer_body", block_hidden_states=block,
                          block_encoder_hidden_states=head["block_encoder_hidden_states"], temb=head["temb"],
                          img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])["final_hidden_states"]
            if self.spec.policy != "off":
                self.residuals[branch] = final - block
        else:
            final = block + self.residuals[branch].to(block.dtype)
        return k.run("transformer_tail", final_hidden_states=final, temb=head["temb"])["latent"]

    def report(self) -> dict:
        """What results.json and the PNG metadata record: the spec and the steps computed and skipped."""
        return {"spec": str(self.spec), "steps_computed": self.computed, "steps_skipped": self.skipped}


def step_cache(k: Kontext, spec: CacheSpec, steps: int) -> StepCache | None:
    """The StepCache of one edit (None for off where the single transformer is there), or one line saying the
    pipeline lacks the split transformer."""
    if spec.policy == "off" and "transformer" in k.stages:
        return None
    missing = [name for name in TRANSFORMER_PARTS if name not in k.stages]
    if missing:
        raise KontextError(f"--cache {spec} runs the split transformer and this pipeline has no {missing[0]}: export "
                           f"it with `kontext-trt export --stages {','.join(TRANSFORMER_PARTS)}` (and build it for "
                           "--engines), or use --cache off")
    if k.lora_refusal is not None:
        raise KontextError(f"--cache {spec} runs the transformer's step-cache parts, which cannot take this pipeline's "
                           f"LoRAs ({k.lora_refusal}); re-export the parts with `kontext-trt export --stages "
                           f"{','.join(TRANSFORMER_PARTS)}`, or use --cache off")
    return StepCache(spec, steps)


def uncached_report(steps: int) -> dict:
    """The report of an edit without a cache."""
    return {"spec": "off", "steps_computed": steps, "steps_skipped": 0}
