"""Synthetic FLUX.1 Kontext [dev] checkpoints: random, seed-deterministic weights in the real snapshot's layout.

Each tensor is drawn from its own generator seeded by sha256(seed, name), so the weights do not depend on
library init order, and the BFL files are a re-keying of the very same tensors as the diffusers folders.
Tokenizers are trained offline (synth.tokenizers).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from kontext_trt.core.bfl_keys import transformer_to_bfl, vae_to_ldm
from kontext_trt.core.checkpoint import BFL_AE, BFL_TRANSFORMER
from kontext_trt.core.checks import check_output_folder, check_seed
from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import remove_stale_temps, replace_dir, temp_dir
from kontext_trt.core.flux_constants import SCHEDULER_CONFIG, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.core.timing import note
from kontext_trt.synth.klein import KLEIN_PRESETS, write_klein
from kontext_trt.synth.tokenizers import CLIP_BOS, CLIP_EOS, write_clip_tokenizer, write_t5_tokenizer
from kontext_trt.synth.trained import TRAINED, TrainedPreset, load_trained, prompt_ids_digest
from kontext_trt.synth.weights import random_weights, write_json, write_safetensors, write_sharded

DIFFUSERS_VERSION = "0.35.0.dev0"
TRANSFORMERS_VERSION = "4.43.3"
MODEL_INDEX = {
    "_class_name": "FluxKontextPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
PRESETS = {
    "tiny": {
        "transformer": {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 14, 14]},
        "vae": {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1},
        "clip": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "projection_dim": 32},
        "t5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2},
    },
    # The trained shapes model's sizes (train/shapes.py trains it; data/shapes/ holds its weights).
    "shapes": {
        "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 14, 14]},
        "vae": {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16},
        "clip": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "projection_dim": 32},
        "t5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2},
    },
    "slim": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
                        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]},
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
        "clip": {"hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 3072,
                 "projection_dim": 768},
        "t5": {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 1, "num_decoder_layers": 1},
    },
}
TRANSFORMER_SHARDS, T5_SHARDS = 3, 2


def write_synthetic_checkpoint(
    out: Path, preset: str = "tiny", seed: int = 0, fmt: str = "diffusers", force: bool = False,
    transformer: dict | None = None, text_length: int = T5_MAX_LEN, untrained: bool = False,
) -> Path:
    """Write a FLUX.1 Kontext [dev] checkpoint ("diffusers" folder or "bfl" single files) atomically to `out`: random
    weights, or for a trained preset (shapes) its shipped weights unless `untrained` (training starts from those);
    the klein presets (synth.klein.KLEIN_PRESETS) write a FLUX.2 [klein] checkpoint in diffusers layout.

    `transformer` overrides entries of the preset's transformer config (e.g. odd widths for tests); `text_length` is
    the T5 prompt length its tokenizer_2 records (model_max_length; a trained preset's own length wins)."""
    out = Path(out)
    if preset not in PRESETS and preset not in KLEIN_PRESETS:
        names = ", ".join([*PRESETS, *KLEIN_PRESETS])
        raise KontextError(f"unknown synthetic preset {preset!r}; choose one of {names}")
    if fmt not in ("diffusers", "bfl"):
        raise KontextError(f"unknown checkpoint format {fmt!r}; choose diffusers or bfl")
    if preset in KLEIN_PRESETS and fmt != "diffusers":
        raise KontextError(f"--preset {preset} is FLUX.2 [klein], which ships in diffusers layout only: drop --format")
    check_output_folder(out, "output folder")
    check_seed(seed)
    if isinstance(text_length, bool) or not isinstance(text_length, int) or not 1 <= text_length <= T5_MAX_LEN:
        raise KontextError(f"text length {text_length!r}: T5 reads 1 to {T5_MAX_LEN} tokens; pick one in that range")
    if out.exists() and not force and any(out.iterdir()):
        raise KontextError(f"{out}: exists and is not empty; pick a new folder or pass --force (force=True) to "
                           "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    tmp = temp_dir(out)
    try:
        if preset in KLEIN_PRESETS:
            sizes, distilled = KLEIN_PRESETS[preset]
            write_klein(tmp, {**sizes, "transformer": {**sizes["transformer"], **(transformer or {})}}, distilled, seed)
        else:
            sizes, trained = PRESETS[preset], None
            if preset in TRAINED and not untrained:
                trained = load_trained(preset)
                sizes, text_length = trained.sizes, trained.text_length
            _write_all(tmp, {**sizes, "transformer": {**sizes["transformer"], **(transformer or {})}}, seed, fmt,
                       text_length, trained)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_all(root: Path, preset: dict, seed: int, fmt: str, text_length: int = T5_MAX_LEN,
               trained: TrainedPreset | None = None) -> None:
    """Write every component, holding one component's weights at a time (random ones, or a trained preset's)."""
    start = time.monotonic()
    weights = trained.weights if trained else {}
    clip_tokenizer = write_clip_tokenizer(root / "tokenizer")
    t5_tokenizer = write_t5_tokenizer(root / "tokenizer_2", text_length)
    if trained:
        check_prompt_ids(clip_tokenizer, t5_tokenizer, trained)
    _progress("tokenizers", root, start)
    _write_clip(root / "text_encoder", preset["clip"], clip_tokenizer, seed, weights.get("text_encoder"))
    _progress("text_encoder (CLIP)", root, start)
    _write_t5(root / "text_encoder_2", preset["t5"], len(t5_tokenizer), seed, weights.get("text_encoder_2"))
    _progress("text_encoder_2 (T5)", root, start)
    vae_config = _vae_config(preset["vae"])
    vae = weights.get("vae") or random_weights(_diffusers_model("AutoencoderKL", vae_config).state_dict(), seed)
    if fmt == "bfl":
        write_safetensors(root / BFL_AE, vae_to_ldm(vae))
    else:
        write_json(root / "vae" / "config.json", vae_config)
        write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", vae)
    del vae
    _progress("vae", root, start)
    transformer_config = _transformer_config(preset["transformer"])
    transformer = weights.get("transformer") or random_weights(
        _diffusers_model("FluxTransformer2DModel", transformer_config).state_dict(), seed)
    if fmt == "bfl":
        write_safetensors(root / BFL_TRANSFORMER, transformer_to_bfl(transformer))
    else:
        write_json(root / "transformer" / "config.json", transformer_config)
        write_sharded(root / "transformer", "diffusion_pytorch_model", transformer, TRANSFORMER_SHARDS)
        write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_json(root / "model_index.json", MODEL_INDEX)
    del transformer
    _progress("transformer", root, start)


def _progress(component: str, root: Path, start: float) -> None:
    """One progress line per finished component on stderr: bytes written so far and elapsed time (not under
    --quiet)."""
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    elapsed = time.monotonic() - start
    note(f"[synth] {component} done: {size / 2**20:.1f} MiB written, {elapsed:.1f}s")


def _transformer_config(preset: dict) -> dict:
    """transformer/config.json as in the real snapshot, with the preset's sizes."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "guidance_embeds": True,
        "in_channels": 64,
        "out_channels": None,
        "patch_size": 1,
        **preset,
    }


def _vae_config(preset: dict) -> dict:
    """vae/config.json as in the real snapshot, with the preset's widths."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
        **preset,
    }


def _diffusers_model(class_name: str, config: dict) -> torch.nn.Module:
    """A diffusers model built on the meta device (names and shapes only)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name).from_config(config)


def _write_clip(folder: Path, preset: dict, tokenizer, seed: int, trained: dict | None = None) -> None:
    """text_encoder/: CLIP-L-style config with ids matching the tokenizer, and model.safetensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids(CLIP_EOS)
    config = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids(CLIP_BOS),
        "dropout": 0.0,
        "eos_token_id": eos,
        "hidden_act": "quick_gelu",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "pad_token_id": eos,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": len(tokenizer),
        **preset,
    }
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    # The real file keeps the historical `text_model.` prefix.
    names = {key if key.startswith("text_model.") else f"text_model.{key}": t for key, t in model.state_dict().items()}
    write_json(folder / "config.json", config)
    write_safetensors(folder / "model.safetensors", trained or random_weights(names, seed))


def _write_t5(folder: Path, preset: dict, vocab_size: int, seed: int, trained: dict | None = None) -> None:
    """text_encoder_2/: T5-v1.1-XXL-style encoder config and two shards (embed_tokens tied to shared, saved once)."""
    from transformers import T5Config, T5EncoderModel

    config = {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
        **preset,
    }
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    names = {key: t for key, t in model.state_dict().items() if key != "encoder.embed_tokens.weight"}
    write_json(folder / "config.json", config)
    write_sharded(folder, "model", trained or random_weights(names, seed), T5_SHARDS)


def check_prompt_ids(clip_tokenizer, t5_tokenizer, trained: TrainedPreset) -> None:
    """Refuse tokenizers that no longer give the ids the trained preset learned (the corpus or trainer changed)."""
    if prompt_ids_digest(clip_tokenizer, t5_tokenizer, trained.text_length) != trained.prompt_ids_sha256:
        raise KontextError("the offline-built tokenizers no longer give the token ids the shapes weights were trained "
                           "with (data/corpus.txt or the tokenizer trainer changed): restore them, or retrain with "
                           "`kontext-trt train shapes --out DIR`")
