"""What the loop knows of a checkpoint (KontextConfig) and the encoded inputs it runs on (Prompt, Context), for every
family; runtime.flow re-exports them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN
from kontext_trt.core.flux_constants import LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.runtime.schedule import ShiftConfig


@dataclass(frozen=True)
class KontextConfig:
    """What the loop needs to know of a checkpoint beyond its stages. `family` picks the loop's family functions
    (runtime.families); distilled, vae_scale_factor and text_layers are FLUX.2 [klein]'s."""

    latent_channels: int = LATENT_CHANNELS
    vae_scale: float = VAE_SCALING_FACTOR
    vae_shift: float = VAE_SHIFT_FACTOR
    guidance_embeds: bool = True
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    family: str = FLUX1_KONTEXT.name
    distilled: bool = True  # klein: step-distilled (no CFG); False: a base checkpoint (true CFG, empty negative)
    vae_scale_factor: int = 8  # pixels per latent cell: 2 ** (len(vae block_out_channels) - 1)
    text_layers: tuple[int, ...] = FLUX2_KLEIN.text_layers
    text_length: int = T5_MAX_LEN  # FLUX.1: T5 tokens a prompt is padded to (manifests from before it: 512)

    def to_dict(self) -> dict:
        """A JSON-ready dict (written into export and engine manifests)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KontextConfig":
        """The inverse of to_dict (manifests written before a field existed get its default)."""
        extra = {"text_layers": tuple(data["text_layers"])} if "text_layers" in data else {}
        return cls(**{**data, "shift": ShiftConfig(**data["shift"]), **extra})

    @classmethod
    def from_checkpoint(cls, ckpt) -> "KontextConfig":
        """Read the loop's facts from a checkpoint's configs (core.checkpoint.Checkpoint), as its family keeps them."""
        return CONFIG_READERS[ckpt.family](ckpt)


def _flux1_config(ckpt) -> KontextConfig:
    """FLUX.1 Kontext: latent channels, VAE scale/shift, guidance, the shift line and the T5 text length
    (tokenizer_2's model_max_length, core.checkpoint)."""
    return KontextConfig(
        latent_channels=ckpt.vae_config["latent_channels"],
        vae_scale=ckpt.vae_config["scaling_factor"],
        vae_shift=ckpt.vae_config["shift_factor"],
        guidance_embeds=bool(ckpt.transformer_config.get("guidance_embeds", False)),
        shift=ShiftConfig.from_scheduler_config(ckpt.scheduler_config),
        text_length=ckpt.text_length,
    )


def _klein_config(ckpt) -> KontextConfig:
    """FLUX.2 [klein]: latent channels, distilled or base (model_index.json's is_distilled), the VAE's scale factor
    and the scheduler's shifting (its mu is the empirical one, runtime.schedule.empirical_mu)."""
    return KontextConfig(
        latent_channels=ckpt.vae_config.get("latent_channels", 32), vae_scale=1.0, vae_shift=0.0,
        guidance_embeds=bool(ckpt.transformer_config.get("guidance_embeds", False)),
        shift=ShiftConfig.from_scheduler_config(ckpt.scheduler_config), family=FLUX2_KLEIN.name,
        distilled=bool((ckpt.pipeline_config or {}).get("is_distilled", False)),
        vae_scale_factor=2 ** (len(ckpt.vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1),
    )


CONFIG_READERS = {FLUX1_KONTEXT.name: _flux1_config, FLUX2_KLEIN.name: _klein_config}


@dataclass(frozen=True)
class Prompt:
    """Encoded prompts: text hidden states (B, L, Dt) and, for FLUX.1, CLIP pooled (B, Dc); float32 on the loop
    device. FLUX.2 [klein] has no pooled embedding (None)."""

    text: torch.Tensor
    pooled: torch.Tensor | None


@dataclass(frozen=True)
class Context:
    """Encoded reference images: their packed latents concatenated (1, M, C') and their ids (M, 3 or 4); width and
    height are the first reference's processed size (the output size when none is asked for)."""

    tokens: torch.Tensor
    ids: torch.Tensor
    width: int
    height: int


def concat_prompts(prompts: list[Prompt]) -> Prompt:
    """Several encoded prompt lists as one batch."""
    pooled = None if prompts[0].pooled is None else torch.cat([p.pooled for p in prompts])
    return Prompt(text=torch.cat([p.text for p in prompts]), pooled=pooled)


def concat_contexts(contexts: list[Context | None], sizes: list[int]) -> Context | None:
    """Input images of one size as one batch: each request's tokens repeated for each of its prompts."""
    if contexts[0] is None:
        return None
    tokens = torch.cat([c.tokens.expand(n, -1, -1) for c, n in zip(contexts, sizes)])
    return Context(tokens, contexts[0].ids, contexts[0].width, contexts[0].height)
