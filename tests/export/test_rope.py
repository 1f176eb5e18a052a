"""The float32 RoPE used for export against diffusers' float64 FluxPosEmbed, at Kontext positions."""
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from kontext_trt.export.rope import Fp32RoPE
from kontext_trt.runtime.latents import latent_ids, text_ids


def test_fp32_rope_matches_float64_reference():
    ids = torch.cat([text_ids(512), latent_ids(166, 84, index=0), latent_ids(196, 84, index=1)])  # 1328x672 + 672x1568
    ref_cos, ref_sin = FluxPosEmbed(10000, [16, 56, 56])(ids)
    cos, sin = Fp32RoPE(10000, (16, 56, 56))(ids)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == ref_cos.shape == (len(ids), 128)
    assert (cos - ref_cos).abs().max() < 1e-5 and (sin - ref_sin).abs().max() < 1e-5
