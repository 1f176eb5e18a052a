"""Model families as data: which pipeline class a checkpoint's model_index.json names, its components, its stages
and their named I/O, and what a request may give it. FLUX.1 Kontext [dev] and FLUX.2 [klein] are the two; what each
does differently in the loop (text encoding, latent packing and ids, schedule, guidance) is runtime/families.py's.

FLUX.2 [klein] stages (B batch, L text tokens, N target tokens, M reference tokens, C the VAE's latent channels,
h/w the latent size; docs/klein.md has the semantics):

| stage        | inputs                                                   | outputs                                   |
|--------------|----------------------------------------------------------|-------------------------------------------|
| text_encoder | input_ids int64 (B, L), attention_mask int64 (B, L)      | text_embeddings (B, L, 3 * Dq): Qwen3 hidden states of three layers |
| vae_encoder  | images (B, 3, 8h, 8w) in [-1, 1]                          | latent (B, 4C, h/2, w/2): posterior mean, patchified, batch-norm normalised |
| vae_decoder  | latent (B, 4C, h/2, w/2), normalised                      | images (B, 3, 8h, 8w) in [-1, 1]           |
| transformer  | hidden_states (B, N+M, 4C), encoder_hidden_states (B, L, 3 * Dq), timestep (B,) in [0, 1], img_ids (N+M, 4), txt_ids (L, 4) | latent (B, N+M, 4C) |
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import read_json
from kontext_trt.core.stages import STAGE_IO, STAGE_NAMES, TRANSFORMER_PARTS

KLEIN_STAGE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_encoder": (("input_ids", "attention_mask"), ("text_embeddings",)),
    "vae_encoder": (("images",), ("latent",)),
    "vae_decoder": (("latent",), ("images",)),
    "transformer": (("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"), ("latent",)),
}


@dataclass(frozen=True)
class Family:
    """One model family: its name, the diffusers pipeline class that marks it, its components (model_index.json
    keys), its stages with their named I/O, the most reference images one edit takes, and the guidance and steps a
    request that gives none runs at (FLUX.1: the distilled guidance embedding's 2.5, 28 steps; klein: diffusers' CFG
    scale 4.0, 4 steps distilled, 50 base)."""

    name: str
    pipeline_class: str
    label: str  # how messages name it
    components: tuple[str, ...]
    stage_names: tuple[str, ...]
    stage_io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    max_references: int
    default_guidance: float
    tokenizers: dict[str, str]  # role -> folder, in the checkpoint and in an export folder alike
    parts: tuple[str, ...] = ()  # the transformer split in parts for step caching (core.stages.TRANSFORMER_PARTS)
    # denoising steps of a request that gives none (runtime.flow.with_defaults): FLUX.1 Kontext [dev]'s 28; klein's
    # step-distilled checkpoints 4 (BFL's model cards), its base checkpoints diffusers' 50 (with CFG)
    default_steps: int = 28
    base_steps: int | None = None  # a base (not step-distilled) checkpoint's count; None: default_steps
    text_layers: tuple[int, ...] = ()  # hidden states of the text encoder stacked as the prompt embedding (klein)

    def steps(self, distilled: bool) -> int:
        """The denoising steps a request that gives none runs on a checkpoint of this family (KontextConfig's
        `distilled`: klein's model_index.json is_distilled)."""
        return self.default_steps if distilled or self.base_steps is None else self.base_steps

    def io(self, stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input names, output names) of one of this family's stages (or of a transformer part)."""
        return self.stage_io.get(stage) or STAGE_IO[stage]

    def engine_stages(self, split: bool = False) -> tuple[str, ...]:
        """The stages an engine set of this family runs, in order; `split` (step caching): the transformer's parts in
        place of the transformer, or one line if this family has none."""
        if not split:
            return self.stage_names
        if not self.parts:
            raise KontextError(f"step caching (--cache) runs the transformer in parts, which {self.label} engines do "
                               "not have: use --cache off", "cache", "invalid_value")
        return tuple(part for name in self.stage_names for part in (self.parts if name == "transformer" else (name,)))


FLUX1_KONTEXT = Family(
    "flux1-kontext", "FluxKontextPipeline", "FLUX.1 Kontext",
    ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    STAGE_NAMES, {name: STAGE_IO[name] for name in STAGE_NAMES}, 1, 2.5, {"clip": "tokenizer", "t5": "tokenizer_2"},
    TRANSFORMER_PARTS)
FLUX2_KLEIN = Family(
    "flux2-klein", "Flux2KleinPipeline", "FLUX.2 [klein]",
    ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    ("text_encoder", "vae_encoder", "transformer", "vae_decoder"), KLEIN_STAGE_IO, 4, 4.0, {"qwen": "tokenizer"},
    default_steps=4, base_steps=50, text_layers=(9, 18, 27))  # Flux2KleinPipeline's text_encoder_out_layers
FAMILIES: dict[str, Family] = {family.name: family for family in (FLUX1_KONTEXT, FLUX2_KLEIN)}
MAX_REFERENCES = max(family.max_references for family in FAMILIES.values())


def known_stage_io() -> list[tuple[str, tuple[tuple[str, ...], tuple[str, ...]]]]:
    """(stage name, (inputs, outputs)) of every family's stages and FLUX.1's transformer parts, FLUX.1's first: what an
    ONNX graph's I/O is matched against."""
    pairs = [*STAGE_IO.items(), *(pair for family in FAMILIES.values() for pair in family.stage_io.items())]
    return list(dict.fromkeys(pairs))


def family_named(name: str) -> Family:
    """The family of this name, or one line naming the known ones."""
    if name not in FAMILIES:
        raise KontextError(f"unknown model family {name!r}: known are {', '.join(FAMILIES)}", "model", "invalid_value")
    return FAMILIES[name]


def family_of_class(class_name: object, source: Path | str) -> Family:
    """The family whose pipeline class model_index.json's _class_name names, or one line naming the supported ones."""
    for family in FAMILIES.values():
        if class_name == family.pipeline_class:
            return family
    supported = ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES.values())
    raise KontextError(f"{source}: _class_name is {class_name!r}, a pipeline this toolkit does not run; supported are "
                       f"{supported}: point --model at one of those checkpoints", "model", "model_mismatch")


def detect_family(root: Path) -> Family:
    """The family of a checkpoint folder: from model_index.json's _class_name (diffusers layout); a folder without one
    (BFL single files) is FLUX.1 Kontext."""
    index_path = root / "model_index.json"
    index = read_json(index_path)
    if index is None:
        return FLUX1_KONTEXT
    return family_of_class(index.get("_class_name"), index_path)
