"""The transformers gpu_blocks times, as data: each family's model sizes with their diffusers config (the FLOP model's:
flops.DEFAULTS for FLUX.1, flops.KLEIN_4B / KLEIN_9B for FLUX.2 [klein]), the diffusers classes of their blocks, the
blocks' modulation inputs, the text length and the family (core.family: label, references, default steps). Imports
no torch, so --dry-run can plan from it; block_timing.py builds and runs what it describes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kontext_trt.benchmarks.flops import DEFAULTS, KLEIN_4B, KLEIN_9B, MLP_RATIO
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, Family

BLOCK_KINDS = ("double", "single")


@dataclass(frozen=True)
class BlockModel:
    """One transformer's blocks: the family and model size, the diffusers config they come from, the block classes,
    each block's modulation inputs {name: width in multiples of hidden} and fixed keyword inputs, the text tokens of
    its prompts (FLUX.1: T5's 512; klein: Qwen3's 512) and what runs attention."""

    family: Family
    size: str
    config: dict
    block_classes: dict[str, str]
    modulation: dict[str, dict[str, int]]
    fixed_inputs: dict[str, dict]
    text_tokens: int
    attention: str

    @property
    def model_class(self) -> str:
        """The diffusers transformer class: the config's _class_name (FLUX.1's DEFAULTS have none)."""
        return self.config.get("_class_name", "FluxTransformer2DModel")

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def head_dim(self) -> int:
        return self.config["attention_head_dim"]

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp_ratio(self) -> float:
        return self.config.get("mlp_ratio", MLP_RATIO)

    @property
    def per_step(self) -> dict[str, int]:
        """Blocks of each kind in one transformer forward."""
        return {"double": self.config["num_layers"], "single": self.config["num_single_layers"]}

    def diffusers_config(self) -> dict:
        """The config as the model class's constructor takes it (without _class_name)."""
        return {key: value for key, value in self.config.items() if not key.startswith("_")}


FLUX1_12B = BlockModel(
    FLUX1_KONTEXT, "12B", dict(DEFAULTS),
    {"double": "FluxTransformerBlock", "single": "FluxSingleTransformerBlock"},
    {"double": {"temb": 1}, "single": {"temb": 1}}, {"double": {}, "single": {}}, 512,
    "diffusers FluxAttnProcessor (torch scaled_dot_product_attention), bf16 in every dtype")
KLEIN_4B_BLOCKS = BlockModel(
    FLUX2_KLEIN, "4B", dict(KLEIN_4B),
    {"double": "Flux2TransformerBlock", "single": "Flux2SingleTransformerBlock"},
    {"double": {"temb_mod_img": 6, "temb_mod_txt": 6}, "single": {"temb_mod": 3}},
    {"double": {}, "single": {"split_hidden_states": True}}, 512,
    "diffusers Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor (torch scaled_dot_product_attention), bf16 in "
    "every dtype")
KLEIN_9B_BLOCKS = replace(KLEIN_4B_BLOCKS, size="9B", config=dict(KLEIN_9B))
MODELS = (FLUX1_12B, KLEIN_4B_BLOCKS, KLEIN_9B_BLOCKS)
FAMILY_NAMES = tuple(dict.fromkeys(model.family.name for model in MODELS))


def block_model(family: str, size: str | None) -> BlockModel:
    """The blocks of a family (core.family name) at a model size (None: the family's first, case-insensitive), or
    one line naming the sizes there are."""
    models = [model for model in MODELS if model.family.name == family]
    if not models:
        raise KontextError(f"--family {family!r}: gpu_blocks times {', '.join(FAMILY_NAMES)}")
    if size is None:
        return models[0]
    for model in models:
        if model.size.lower() == size.lower():
            return model
    raise KontextError(f"--model-size {size!r}: {models[0].family.label} comes in "
                       f"{', '.join(model.size for model in models)}")


def edit_tokens(model: BlockModel, width: int, height: int, references: int) -> dict[str, int]:
    """Token counts of an edit of this size with `references` reference images of the same size (one token per
    16x16 pixels in both families), or one line if the family takes fewer references."""
    most = model.family.max_references
    if not 0 <= references <= most:
        raise KontextError(f"--references {references}: {model.family.label} takes 0 to {most} reference images")
    image = (width // 16) * (height // 16)
    return {"target": image, "context": references * image, "references": references, "text": model.text_tokens,
            "sequence": (1 + references) * image + model.text_tokens}


def block_input_shapes(model: BlockModel, tokens: dict[str, int]) -> dict[str, dict]:
    """Each block's keyword inputs: the shapes of its tensors (RoPE as its cos and sin tables) and its fixed values."""
    hidden = model.hidden
    common = {"hidden_states": [1, tokens["target"] + tokens["context"], hidden],
              "encoder_hidden_states": [1, tokens["text"], hidden]}
    rope = [[tokens["sequence"], model.head_dim]] * 2
    return {kind: {**common, **{name: [1, k * hidden] for name, k in model.modulation[kind].items()},
                   "image_rotary_emb": rope, **model.fixed_inputs[kind]}
            for kind in BLOCK_KINDS}
