"""FLUX.2 [klein]'s torch stage modules (named I/O in core.family.KLEIN_STAGE_IO): the Qwen3 text encoder with its
three stacked hidden layers, the Flux2 VAE with patchify and batch-norm normalisation inside, and the
Flux2Transformer2DModel. export/ can trace the same modules."""
from __future__ import annotations

import torch
from torch import nn


class Qwen3TextModule(nn.Module):
    """Qwen3: (input_ids, attention_mask) -> the hidden states of `layers` stacked per token, (B, L, len(layers) * D),
    as Flux2KleinPipeline._get_qwen3_prompt_embeds (hidden_states[0] is the embedding output)."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.layers = model, tuple(layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        # Qwen3's own default (0..L-1), given per batch row: the exported graph's fused RotaryEmbedding then gets cos/sin
        # of the input's batch, which ONNX Runtime requires (a (1, L) default fails it at batch 2).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[i] for i in self.layers], dim=1)  # (B, K, L, D)
        b, n, length, d = stacked.shape
        return (stacked.permute(0, 2, 1, 3).reshape(b, length, n * d),)


def load_qwen3_text(ckpt, dtype: torch.dtype) -> Qwen3TextModule:
    """The text encoder stage of a klein checkpoint in dtype: its Qwen3 cut to the layers klein reads
    (core.klein_checkpoint.load_qwen3), stacking FLUX2_KLEIN.text_layers; the torch backend, export and quant's."""
    from kontext_trt.core import klein_checkpoint as kc
    from kontext_trt.core.family import FLUX2_KLEIN

    return Qwen3TextModule(kc.load_qwen3(ckpt, dtype), FLUX2_KLEIN.text_layers)


def bn_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE batch norm's running mean and sqrt(var + eps), (1, 4C, 1, 1) in like's dtype and device."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class KleinVaeEncoderModule(nn.Module):
    """images in [-1, 1] -> posterior mean, 2x2-patchified to (B, 4C, h/2, w/2) and batch-norm normalised."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        latents = self.vae.encode(images).latent_dist.mode()
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = bn_stats(self.vae, latents)
        return ((latents - mean) / std,)


class KleinVaeDecoderModule(nn.Module):
    """Normalised patchified latents (B, 4C, h/2, w/2) -> images in [-1, 1]: batch norm undone, unpatchified,
    decoded."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        mean, std = bn_stats(self.vae, latent)
        latents = latent * std + mean
        b, c4, h, w = latents.shape
        latents = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)
        return (self.vae.decode(latents, return_dict=False)[0],)


class Flux2TransformerModule(nn.Module):
    """Flux2Transformer2DModel with klein's engine I/O names (no guidance: klein has no guidance embedding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)
        return (out[0],)


def klein_stage_modules(ckpt, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The four stage modules of a klein checkpoint in dtype, on the CPU."""
    from kontext_trt.core import klein_checkpoint as kc

    vae = kc.load_klein_vae(ckpt, dtype)
    return {
        "text_encoder": load_qwen3_text(ckpt, dtype),
        "vae_encoder": KleinVaeEncoderModule(vae),
        "transformer": Flux2TransformerModule(kc.load_klein_transformer(ckpt, dtype)),
        "vae_decoder": KleinVaeDecoderModule(vae),
    }
