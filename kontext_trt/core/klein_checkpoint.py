"""Open and load a FLUX.2 [klein] checkpoint in diffusers layout (Flux2KleinPipeline), offline: the
Flux2Transformer2DModel, the AutoencoderKLFlux2 (with its batch-norm latent statistics), the Qwen3 text encoder and
its tokenizer with the chat template. Weights are assigned into meta-built models, as core/checkpoint.py does."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from kontext_trt.core.checkpoint import Checkpoint, _assign, _component_files, _load_json, _read_cast, _weight_files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX2_KLEIN

KLEIN_HUB_ID = "black-forest-labs/FLUX.2-klein-4B"
KLEIN_REFETCH = f"re-download it (hf download {KLEIN_HUB_ID} --local-dir DIR, or the 9B/base variant) or regenerate it"


def open_klein(root: Path) -> Checkpoint:
    """Validate a klein folder's configs, tokenizer and weight headers; no weights read."""
    index = _load_json(root / "model_index.json")
    transformer_config = _load_json(root / "transformer" / "config.json")
    vae_config = _load_json(root / "vae" / "config.json")
    scheduler_config = _load_json(root / "scheduler" / "scheduler_config.json")
    text_config = _load_json(root / "text_encoder" / "config.json")
    _check(transformer_config, vae_config, text_config, root)
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        raise KontextError(f"{root / 'tokenizer'}: no tokenizer.json (the Qwen tokenizer); {KLEIN_REFETCH}",
                           "model", "not_found")
    files = _weight_files(root / "transformer", "diffusion_pytorch_model")
    files += _weight_files(root / "vae", "diffusion_pytorch_model")
    files += _weight_files(root / "text_encoder", "model")
    return Checkpoint(root, "diffusers", transformer_config, vae_config, scheduler_config, tuple(files),
                      family=FLUX2_KLEIN.name, text_config=text_config, pipeline_config=index)


def _check(transformer: dict, vae: dict, text: dict, root: Path) -> None:
    """Refuse configs whose widths do not fit together (what diffusers would fail on at the first step)."""
    channels = vae.get("latent_channels", 0) * 4
    if transformer.get("in_channels") != channels:
        raise KontextError(f"{root / 'transformer/config.json'}: in_channels is {transformer.get('in_channels')}, but "
                           f"the VAE's latent_channels {vae.get('latent_channels')} pack to {channels}; "
                           f"{KLEIN_REFETCH}", "model", "model_mismatch")
    heads, head_dim = transformer.get("num_attention_heads", 0), transformer.get("attention_head_dim", 0)
    if heads * head_dim <= 0 or sum(transformer.get("axes_dims_rope", (32, 32, 32, 32))) != head_dim:
        raise KontextError(f"{root / 'transformer/config.json'}: attention heads/head dim/axes_dims_rope missing or "
                           f"inconsistent; {KLEIN_REFETCH}", "model", "invalid_value")
    layers, depth = text.get("num_hidden_layers", 0), qwen3_depth(FLUX2_KLEIN.text_layers)
    if text.get("model_type") != "qwen3" or layers < depth:
        raise KontextError(f"{root / 'text_encoder/config.json'}: a {text.get('model_type')} of {layers} layers, not a "
                           f"Qwen3 of at least {depth} (klein stacks the hidden states of layers "
                           f"{', '.join(map(str, FLUX2_KLEIN.text_layers))}); {KLEIN_REFETCH}", "model",
                           "model_mismatch")


def load_klein_transformer(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The Flux2Transformer2DModel of `ckpt` in `dtype`."""
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights(include_buffers=False):
        model = Flux2Transformer2DModel.from_config(ckpt.transformer_config)
    files = _component_files(ckpt, "transformer")
    return _assign(model, _read_cast(files, dtype), files)


def load_klein_vae(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The AutoencoderKLFlux2 of `ckpt` in `dtype` (its batch norm's running statistics included)."""
    from diffusers import AutoencoderKLFlux2

    with init_empty_weights(include_buffers=False):
        model = AutoencoderKLFlux2.from_config(ckpt.vae_config)
    files = _component_files(ckpt, "vae")
    sd = _read_cast(files, dtype)
    return _assign(model, {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}, **sd},
                   files)


def qwen3_depth(text_layers: tuple[int, ...]) -> int:
    """How many Qwen3 decoder layers a family that stacks hidden states `text_layers` runs: up to the deepest it
    reads (hidden_states[0] is the embedding output, hidden_states[k] decoder layer k's)."""
    return max(text_layers)


def load_qwen3(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The Qwen3 decoder stack of `ckpt`'s text encoder (Qwen3Model: the causal LM's `model`, no LM head), cut to the
    layers klein reads (qwen3_depth: 27 of Qwen3-4B/8B's 36); the deeper layers' weights are never read.

    transformers returns the final-normed output as the last of `hidden_states` (5.x ties it to last_hidden_state,
    4.x appends it), so Flux2KleinPipeline's hidden_states[27] is decoder layer 27's raw output when the encoder has
    more layers (Qwen3-4B/8B: 36) and the normed one when it has exactly 27. The cut model keeps the final norm only
    in that second case and is an identity otherwise: its hidden_states[k] for k in FLUX2_KLEIN.text_layers equal the
    full encoder's bit for bit (tests/klein/test_klein_qwen3.py)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config.from_pretrained(ckpt.root / "text_encoder", local_files_only=True)
    depth = qwen3_depth(FLUX2_KLEIN.text_layers)
    normed = config.num_hidden_layers == depth
    config.num_hidden_layers = depth
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:depth]
    with init_empty_weights(include_buffers=False):
        model = Qwen3Model(config)
    if not normed:
        model.norm = nn.Identity()
    files = _component_files(ckpt, "text_encoder")
    keep = partial(_read_qwen3, depth, normed)
    sd = {key.removeprefix("model."): t for key, t in _read_cast(files, dtype, keep).items()}
    return _assign(model, sd, files)


def _read_qwen3(depth: int, normed: bool, key: str) -> bool:
    """Whether a Qwen3ForCausalLM weight is one of the first `depth` layers' (the final norm's when `normed`), the
    embedding's included; the LM head never."""
    name = key.removeprefix("model.")
    if name.startswith("layers."):
        return int(name.split(".")[1]) < depth
    return name != "lm_head.weight" and (normed or name != "norm.weight")


def load_qwen_tokenizer(folder: Path):
    """The Qwen tokenizer of a klein checkpoint (or an export's copy), with its chat template, offline."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise KontextError(f"{folder}: the tokenizer has no chat template (klein encodes prompts through it); "
                           f"{KLEIN_REFETCH}", "model", "invalid_value")
    return tokenizer
