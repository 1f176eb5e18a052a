"""diffusers -> BFL key mapping for the FLUX transformer and the LDM-style autoencoder (ae.safetensors).

The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint`
(loaders/single_file_utils.py). BFL fuses q/k/v (double blocks) and q/k/v/mlp (single blocks), stores the final
modulation as (shift, scale) where diffusers has (scale, shift), keeps the LDM VAE's 1x1-conv attention weights
and numbers the decoder's `up.{i}` blocks in reverse.
"""
from __future__ import annotations

import re

import torch

_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

# (pattern, replacement) applied in order to each diffusers VAE key, after the decoder up blocks are renumbered.
_VAE_RULES = (
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def transformer_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key a diffusers FluxTransformer2DModel state dict into BFL's flux1-*.safetensors names."""
    pending, out = dict(sd), {}
    for i in _block_ids(sd, "transformer_blocks"):
        _fuse(pending, out, f"transformer_blocks.{i}.", f"double_blocks.{i}.", _DOUBLE_FUSED)
        _rename(pending, out, f"transformer_blocks.{i}.", f"double_blocks.{i}.", _DOUBLE)
    for i in _block_ids(sd, "single_transformer_blocks"):
        _fuse(pending, out, f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _SINGLE_FUSED)
        _rename(pending, out, f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _SINGLE)
    _rename(pending, out, "", "", _TOP)
    for param in ("weight", "bias"):
        scale, shift = pending.pop(f"norm_out.linear.{param}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
    if pending:
        raise ValueError(f"no BFL name for diffusers transformer keys {sorted(pending)[:4]}")
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key a diffusers AutoencoderKL state dict into BFL's ae.safetensors (LDM) names, without a prefix."""
    num_up = 1 + max(_block_ids(sd, "decoder.up_blocks"))
    out = {}
    for key, tensor in sd.items():
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.",
            lambda m: _ldm_up(num_up - 1 - int(m[1]), m[2], int(m[3])),
            key,
        )
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        for pattern, replacement in _VAE_RULES:
            new = re.sub(pattern, replacement, new)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def _ldm_up(block: int, kind: str, index: int) -> str:
    """LDM name prefix of a decoder up block's resnet or upsampler."""
    return f"decoder.up.{block}.block.{index}." if kind == "resnets" else f"decoder.up.{block}.upsample."


def _block_ids(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted block indices under `prefix.N.`."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m[1]) for key in sd if (m := pattern.match(key))})


def _param(bfl_module: str, param: str) -> str:
    """BFL parameter name: RMSNorm weights are called `scale`."""
    return "scale" if bfl_module.endswith("_norm") and param == "weight" else param


def _rename(pending: dict, out: dict, src: str, dst: str, table: dict[str, str]) -> None:
    """Move one-to-one renamed weights/biases from `pending` into `out`."""
    for module, bfl_module in table.items():
        for param in ("weight", "bias"):
            key = f"{src}{module}.{param}"
            if key in pending:
                out[f"{dst}{bfl_module}.{_param(bfl_module, param)}"] = pending.pop(key)


def _fuse(pending: dict, out: dict, src: str, dst: str, table: dict[str, tuple[str, ...]]) -> None:
    """Move projections fused by BFL, concatenated along the output dim, from `pending` into `out`."""
    for bfl_module, parts in table.items():
        for param in ("weight", "bias"):
            out[f"{dst}{bfl_module}.{param}"] = torch.cat([pending.pop(f"{src}{part}.{param}") for part in parts])
