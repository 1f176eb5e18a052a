"""BFL single files -> diffusers: the configs inferred from a flux1-kontext-dev.safetensors / ae.safetensors
header's tensor shapes, and the transformer's keys through diffusers' converter (the inverse of bfl_keys.py)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.flux_constants import REFETCH, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR

# diffusers' convert_flux_transformer_checkpoint_to_diffusers splits single_blocks.N.linear1 as (3072,)*3 + (12288,).
_CONVERTER_LINEAR1_ROWS = 3 * 3072 + 4 * 3072


def transformer_config_from_shapes(shapes: dict[str, list[int]], source: Path) -> dict:
    """diffusers config of a BFL transformer file, inferred from tensor shapes.

    Rule: RoPE axes are (d/8, 7d/16, 7d/16) of the head dim d, which gives the real (16, 56, 56) for d = 128.
    """
    shapes = {key.removeprefix("model.diffusion_model."): shape for key, shape in shapes.items()}
    needed = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
              "double_blocks.0.img_attn.norm.query_norm.scale")
    for key in needed:
        if key not in shapes:
            raise KontextError(f"{source}: no tensor {key}, so not a FLUX transformer in BFL naming; {REFETCH}")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    out_channels = shapes["final_layer.linear.weight"][0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": head_dim,
        "axes_dims_rope": [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "in_channels": in_channels,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "num_attention_heads": hidden // head_dim,
        "num_layers": _count_blocks(shapes, "double_blocks"),
        "num_single_layers": _count_blocks(shapes, "single_blocks"),
        "out_channels": None if out_channels == in_channels else out_channels,
        "patch_size": 1,
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
    }


def vae_config_from_shapes(shapes: dict[str, list[int]], source: Path) -> dict:
    """diffusers AutoencoderKL config of BFL's ae.safetensors, inferred from tensor shapes.

    Rule: GroupNorm has 32 groups and the scaling/shift factors are FLUX's constants (neither is in the file).
    """
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
              "encoder.down.0.block.0.conv1.weight")
    for key in needed:
        if key not in shapes:
            raise KontextError(f"{source}: no tensor {key}, so not an LDM/BFL autoencoder; {REFETCH}")
    num_blocks = _count_blocks(shapes, "encoder.down")
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(num_blocks)],
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "force_upcast": True,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": _count_blocks(shapes, "encoder.down.0.block"),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        "norm_num_groups": 32,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
    }


def _count_blocks(shapes: dict, prefix: str) -> int:
    """Number of distinct `prefix.N.` blocks."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m[1] for key in shapes if (m := pattern.match(key))})


def transformer_to_diffusers(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL -> diffusers transformer keys through diffusers' converter.

    The converter hardcodes the real width when splitting single_blocks.N.linear1, so those are split here
    (as views) and the converter gets zero-size stand-ins whose outputs are replaced.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = {key.removeprefix("model.diffusion_model."): t for key, t in sd.items()}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    fused = {key: sd[key] for key in sd if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", key)}
    sd.update({key: torch.empty(_CONVERTER_LINEAR1_ROWS, 0) for key in fused})
    out = convert_flux_transformer_checkpoint_to_diffusers(sd)
    for key, tensor in fused.items():
        block, param = key.split(".")[1], key.rsplit(".", 1)[1]
        parts = tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden])
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
            out[f"single_transformer_blocks.{block}.{name}.{param}"] = part
    return out
