"""What the one loop (runtime.flow) does differently per model family: prompt encoding, reference encoding, latent
noise, packing and ids, the schedule, guidance, the transformer's inputs and decoding. Each family is one object
with the same methods; `family_ops(config.family)` picks it. FLUX.1 Kontext's is here, FLUX.2 [klein]'s in
runtime/klein.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, Family
from kontext_trt.core.text import CLIP_LEN, tokenize
from kontext_trt.runtime.inputs import Context, KontextConfig, Prompt
from kontext_trt.runtime.latents import draw_noise, latent_ids, pack_latents, text_ids, unpack_latents
from kontext_trt.runtime.schedule import flow_schedule

if TYPE_CHECKING:
    from kontext_trt.runtime.flow import EditRequest, Kontext


class Flux1Kontext:
    """FLUX.1 Kontext [dev]: CLIP pooled + T5 text, one reference at index 1, 16-channel latents packed 2x2 with
    [index, row, col] ids, the mu-line schedule, distilled guidance embedding (true CFG only with a negative
    prompt)."""

    family: Family = FLUX1_KONTEXT

    def check(self, k: Kontext, req: EditRequest) -> None:
        """Refuse what this family cannot run: more than one image, or one it cannot take at its own size (without
        auto_resize, a side outside 64..2048)."""
        if len(req.images) > 1:
            raise KontextError(f"{self.family.label} edits from one image, {len(req.images)} were given: pass one "
                               "--image (FLUX.2 [klein] checkpoints take up to 4)", "image", "out_of_range")
        for img in req.images:
            im.check_context_size(*img.size, req.auto_resize)

    def reference_sizes(self, config: KontextConfig, req: EditRequest) -> tuple[tuple[int, int], ...]:
        """The size each reference is resized to (bucket or own size, floored to 16)."""
        return tuple(im.context_size(*img.size, auto_resize=req.auto_resize) for img in req.images)

    def output_size(self, config: KontextConfig, req: EditRequest) -> tuple[int, int]:
        """Explicit size if given; else the resized input size (BFL's behaviour); else 1024x1024."""
        if req.width is not None:
            return req.width, req.height
        sizes = self.reference_sizes(config, req)
        return sizes[0] if sizes else (1024, 1024)

    def encode_prompts(self, k: Kontext, prompts: list[str]) -> Prompt:
        """CLIP pooled (77 tokens) and T5 hidden states (512 tokens) for a list of prompts."""
        clip_ids = tokenize(k.tokenizer, prompts, CLIP_LEN, "CLIP").to(k.device)
        t5_ids = tokenize(k.tokenizer_2, prompts, k.config.text_length, "T5").to(k.device)
        pooled = k.run("clip", input_ids=clip_ids)["pooled_embeddings"]
        text = k.run("t5", input_ids=t5_ids)["text_embeddings"]
        return Prompt(text=text.float(), pooled=pooled.float())

    def encode_context(self, k: Kontext, images: list[Image.Image], auto_resize: bool = True) -> Context:
        """Resize the input image (bucket or own size, floored to 16), VAE-encode its mean, shift, scale, pack."""
        image = images[0]
        width, height = im.context_size(*image.size, auto_resize=auto_resize)
        im.check_size(width, height)
        pixels = im.image_to_tensor(image, width, height).to(k.device)
        mean = k.run("vae_encoder", images=pixels)["latent"].float()
        latents = (mean - k.config.vae_shift) * k.config.vae_scale
        h, w = latents.shape[-2:]
        return Context(pack_latents(latents), latent_ids(h, w, index=1).to(k.device), width, height)

    def noise(self, k: Kontext, batch: int, width: int, height: int, seed: int) -> torch.Tensor:
        """Packed (B, N, 64) noise drawn as (B, 16, h, w) from manual_seed(seed) on the CPU."""
        return pack_latents(draw_noise(batch, k.config.latent_channels, width, height, seed))

    def target_ids(self, k: Kontext, width: int, height: int) -> torch.Tensor:
        """(N, 3) ids of the target tokens, index 0."""
        return latent_ids(2 * (height // 16), 2 * (width // 16), index=0)

    def text_ids(self, k: Kontext, length: int) -> torch.Tensor:
        """(L, 3) zeros."""
        return text_ids(length)

    def schedule(self, k: Kontext, steps: int, n_tokens: int) -> torch.Tensor:
        """The mu-line shifted sigmas."""
        return flow_schedule(steps, n_tokens, k.config.shift)

    def guidance(self, k: Kontext, req: EditRequest) -> float:
        """The distilled guidance embedding's value (0 where the checkpoint has none)."""
        return req.guidance if k.config.guidance_embeds else 0.0

    def cfg(self, k: Kontext, req: EditRequest) -> tuple[str, float] | None:
        """(negative prompt, scale) of true CFG: only with a negative prompt and --true-cfg above 1."""
        if req.negative_prompt is not None and req.true_cfg > 1:
            return req.negative_prompt, req.true_cfg
        return None

    def transformer_inputs(self, k: Kontext, prompt: Prompt, hidden: torch.Tensor, t: torch.Tensor,
                           ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor) -> dict:
        """The transformer's named inputs of one step."""
        return dict(hidden_states=hidden, encoder_hidden_states=prompt.text, pooled_projections=prompt.pooled,
                    timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=guidance)

    def decode(self, k: Kontext, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Unpack (B, N, 64) latents, undo scale and shift, VAE-decode to (B, 3, H, W) in [-1, 1]."""
        latents = unpack_latents(x, 2 * (height // 16), 2 * (width // 16))
        latents = latents / k.config.vae_scale + k.config.vae_shift
        return k.run("vae_decoder", latent=latents)["images"].float()


def family_ops(name: str):
    """The loop functions of the family named (core.family)."""
    from kontext_trt.runtime.klein import Flux2Klein

    ops = {FLUX1_KONTEXT.name: Flux1Kontext, Flux2Klein.family.name: Flux2Klein}
    if name not in ops:
        raise KontextError(f"unknown model family {name!r}: known are {', '.join(ops)}")
    return ops[name]()
