"""The five stages and their I/O contract: every backend maps named tensors in to named tensors out.

Names follow the diffusers/BFL (and TensorRT demoDiffusion) convention, so engines built from BFL's
published ONNX run unchanged. Shapes (B batch, N target tokens, M context tokens, h/w latent size, S the T5 text
tokens: the checkpoint's text length, KontextConfig.text_length, 512 for FLUX.1 Kontext [dev]):

| stage       | inputs                                                        | outputs                       |
|-------------|---------------------------------------------------------------|-------------------------------|
| clip        | input_ids int64 (B, 77)                                        | text_embeddings (B, 77, Dc), pooled_embeddings (B, Dc) |
| t5          | input_ids int64 (B, S)                                         | text_embeddings (B, S, Dt)    |
| vae_encoder | images (B, 3, 8h, 8w) in [-1, 1]                               | latent (B, 16, h, w): posterior mean, unscaled |
| vae_decoder | latent (B, 16, h, w), unscaled                                 | images (B, 3, 8h, 8w) in [-1, 1] |
| transformer | hidden_states (B, N+M, 64), encoder_hidden_states (B, S, Dt), pooled_projections (B, Dc), timestep (B,) in [0, 1], img_ids (N+M, 3), txt_ids (S, 3), guidance (B,) | latent (B, N+M, 64) |

The transformer split in three for step caching (runtime/transformer_parts.py, runtime/step_cache.py); optional
stages, exported with `--stages transformer_head,transformer_body,transformer_tail`. D is the hidden width (3072):

| stage            | inputs                                                        | outputs                       |
|------------------|---------------------------------------------------------------|-------------------------------|
| transformer_head | the transformer's inputs                                       | block_hidden_states (B, N+M, D), block_encoder_hidden_states (B, S, D), temb (B, D), first_block_residual (B, N+M, D), modulated_input (B, N+M, D) |
| transformer_body | block_hidden_states, block_encoder_hidden_states, temb, img_ids, txt_ids | final_hidden_states (B, N+M, D): before norm_out |
| transformer_tail | final_hidden_states, temb                                      | latent (B, N+M, 64)           |

Head: embedders and the first double block; first_block_residual is its output minus its input (First-Block
Cache's indicator), modulated_input its norm1(hidden, temb) (TeaCache's). Body: every other block. Tail: norm_out
and proj_out. The body returns hidden states, not a residual, so a computed step does the single graph's arithmetic.

The loop hands float inputs over as float32 (ids and timestep stay float32); each adapter casts to the
dtype its backend wants and may return outputs in its own dtype.

Optional abilities are Protocols below: a stage has one when it has its methods (`isinstance(stage, SupportsX)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterable, Protocol, runtime_checkable

from kontext_trt.core.errors import KontextError

if TYPE_CHECKING:  # annotations only: core.family (and gpu_blocks --dry-run through it) stays free of torch
    import torch

STAGE_NAMES = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder")
TRANSFORMER_PARTS = ("transformer_head", "transformer_body", "transformer_tail")
SPLIT_STAGE_NAMES = ("clip", "t5", "vae_encoder", *TRANSFORMER_PARTS, "vae_decoder")  # step caching on engines


def stage_list(values: list[str], flag: str = "--stages") -> tuple[str, ...]:
    """--stages as export and build both take it: names separated by commas or spaces (`clip,t5` or `clip t5`),
    each a stage of a family (core.family) or a transformer part, in the order given, duplicates dropped; one line names an unknown one."""
    from kontext_trt.core.family import known_stage_io

    names = tuple(dict.fromkeys(name.strip() for value in values for name in value.split(",") if name.strip()))
    known = tuple(dict.fromkeys([*STAGE_NAMES, *TRANSFORMER_PARTS, *(name for name, _ in known_stage_io())]))
    for name in names:
        if name not in known:
            raise KontextError(f"{flag}: unknown stage {name!r}: use any of {','.join(known)}")
    return names

STAGE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clip": (("input_ids",), ("text_embeddings", "pooled_embeddings")),
    "t5": (("input_ids",), ("text_embeddings",)),
    "vae_encoder": (("images",), ("latent",)),
    "vae_decoder": (("latent",), ("images",)),
    "transformer": (
        ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"),
        ("latent",),
    ),
    "transformer_head": (
        ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"),
        ("block_hidden_states", "block_encoder_hidden_states", "temb", "first_block_residual", "modulated_input"),
    ),
    "transformer_body": (
        ("block_hidden_states", "block_encoder_hidden_states", "temb", "img_ids", "txt_ids"),
        ("final_hidden_states",),
    ),
    "transformer_tail": (("final_hidden_states", "temb"), ("latent",)),
}


class Stage(Protocol):
    """A stage: named tensors in, named tensors out."""

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class SupportsGraphCapture(Protocol):
    """A stage that tells runtime.cudagraphs when it must not be captured, and when captured graphs went stale."""

    @property
    def graph_epoch(self) -> Hashable:
        """Changes whenever memory a captured graph points at changes (an engine loaded or freed, scratch moved)."""
        ...

    def graph_refusal(self) -> str | None:
        """Why the stage must not be captured now, or None if it may."""
        ...


@runtime_checkable
class SupportsMemoryStats(Protocol):
    """A stage that reports its own memory figures (bytes), e.g. a TensorRT engine's weights and scratch."""

    def memory_stats(self) -> dict[str, int]: ...


@runtime_checkable
class SetsWeights(Protocol):
    """A stage whose weights can be swapped in place (LoRAs: runtime.lora).

    Weights are named as the diffusers model's parameters (transformer_blocks.0.attn.to_q.weight) and given in torch
    layout ((out, in) for a linear layer), whatever name and layout the backend keeps them under.
    """

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every swappable weight's shape, by name."""
        ...

    def base_weight(self, name: str) -> torch.Tensor:
        """The weight as loaded (before any set_weights)."""
        ...

    def set_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the named weights; every weight not named goes back to its base."""
        ...


@runtime_checkable
class SharesWeights(Protocol):
    """A stage that runs another stage's weights (torch's transformer parts run the transformer's own modules): a
    LoRA set on that stage (`weights_of`, None: its own) reaches it too."""

    weights_of: str | None


@runtime_checkable
class RefitsWeights(Protocol):
    """A stage whose weights are swapped through another object (a TensorRT engine refit by name)."""

    def weight_target(self) -> SetsWeights:
        """The SetsWeights that swaps this stage's weights (made once per stage)."""
        ...


@dataclass(frozen=True)
class DimRange:
    """The allowed values of one dynamic dim."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1


def eval_dim(dim: int | str, values: dict[str, int]) -> int:
    """A dim's size given the input dims' values: an int, a name, "K*name" or "name/K"."""
    if isinstance(dim, int):
        return dim
    if "*" in dim:
        factor, name = dim.split("*")
        return int(factor) * values[name]
    if "/" in dim:
        name, divisor = dim.split("/")
        return values[name] // int(divisor)
    return values[dim]
