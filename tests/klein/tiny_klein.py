"""Tiny FLUX.2 [klein] checkpoints for the parity tests: synth's builder (diffusers' and transformers' own classes,
the offline Qwen2 tokenizer) at other widths than the synth presets."""
from __future__ import annotations

from pathlib import Path

from kontext_trt.synth.klein import KLEIN_TINY, write_klein

PARITY_SIZES = {
    "text_encoder": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 28, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 12},
    "transformer": {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                    "timestep_guidance_channels": 32, "mlp_ratio": 2.0, "axes_dims_rope": (4, 4, 4, 4)},
    "vae": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "latent_channels": 8, "norm_num_groups": 8},
}
assert PARITY_SIZES != KLEIN_TINY  # the issue asks for parity on shapes other than the synth preset's


def write_tiny_klein(root: Path, distilled: bool, seed: int = 0) -> Path:
    """A random klein checkpoint (distilled: no CFG; base: true CFG) in diffusers layout under root."""
    return write_klein(root, PARITY_SIZES, distilled, seed)
