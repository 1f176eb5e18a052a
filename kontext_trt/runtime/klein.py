"""FLUX.2 [klein]'s loop functions (the runtime.families interface), as diffusers' Flux2KleinPipeline runs them:
Qwen3 prompts through the chat template, up to four references each resized to at most 1 MP and center-cropped to
the VAE multiple, packed one token per latent cell with [t, row, col, 0] ids (t = 10, 20, ... per reference, 0 for
the target), the empirical-mu schedule, and true CFG with an empty negative prompt on base checkpoints only.
docs/klein.md has the details."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from PIL import Image

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX2_KLEIN, Family
from kontext_trt.core.text import cut
from kontext_trt.runtime.inputs import Context, KontextConfig, Prompt
from kontext_trt.runtime.schedule import klein_schedule

if TYPE_CHECKING:
    from kontext_trt.runtime.flow import EditRequest, Kontext

TEXT_LEN = 512  # Flux2KleinPipeline's max_sequence_length
MAX_AREA = 1024 * 1024  # references above this many pixels are resized down to it
MIN_SIDE, MAX_ASPECT = 64, 8  # Flux2ImageProcessor.check_image_input
DEFAULT_SIZE = 1024  # text-to-image without a size: default_sample_size 128 latent cells x 8
REFERENCE_T = 10  # reference i (from 0) sits at t = REFERENCE_T * (i + 1)
log = logging.getLogger(__name__)


def reference_size(width: int, height: int, multiple: int) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(the size a reference is first resized to, or None if it is not; the size it is then cropped to)."""
    resized = None
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        resized = width, height = int(width * scale), int(height * scale)
    return resized, (width // multiple * multiple, height // multiple * multiple)


def reference_pixels(image: Image.Image, multiple: int) -> torch.Tensor:
    """A reference as the VAE takes it, (1, 3, H, W) in [-1, 1]: resized to at most 1 MP (LANCZOS), then
    center-cropped (not resized) to a multiple of `multiple` a side."""
    resized, (width, height) = reference_size(*image.size, multiple)
    if resized is not None:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return im.image_to_tensor(image.crop((left, top, left + width, top + height)), width, height)


def token_side(config: KontextConfig) -> int:
    """Pixels per packed token side: two latent cells (the VAE stage patchifies 2x2)."""
    return 2 * config.vae_scale_factor


def grid_ids(t: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 4) float32 ids [t, row, col, 0], row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, t), r, c, torch.zeros_like(r)], dim=-1).reshape(-1, 4).float()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h * w, C): one token per latent cell (the VAE stage already patchified 2x2)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


class Flux2Klein:
    """FLUX.2 [klein] 4B/9B, distilled or base."""

    family: Family = FLUX2_KLEIN

    def multiple(self, k: Kontext) -> int:
        """Pixels per packed token side (16 for the real VAE)."""
        return token_side(k.config)

    def check(self, k: Kontext, req: EditRequest) -> None:
        """Refuse what klein cannot run, one line each."""
        if len(req.images) > self.family.max_references:
            raise KontextError(f"{self.family.label} takes up to {self.family.max_references} reference images, "
                               f"{len(req.images)} were given", "image", "out_of_range")
        for img in req.images:
            w, h = img.size
            if min(w, h) < MIN_SIDE or max(w / h, h / w) > MAX_ASPECT:
                raise KontextError(f"a reference image is {w}x{h}: {self.family.label} needs both sides at least "
                                   f"{MIN_SIDE} pixels and an aspect ratio of at most {MAX_ASPECT}:1", "image",
                                   "out_of_range")
        if req.true_cfg != 1:
            raise KontextError(f"{self.family.label} takes no --true-cfg: a base checkpoint's CFG scale is --guidance "
                               "(a distilled one runs without CFG)", "true_cfg", "invalid_value")
        if req.negative_prompt is not None and k.config.distilled:
            raise KontextError(f"this {self.family.label} checkpoint is step-distilled and runs without CFG, so it has "
                               "no use for --negative-prompt: drop it", "negative_prompt", "invalid_value")
        if req.cache.policy != "off":
            raise KontextError(f"--cache {req.cache}: step caching is not available for {self.family.label} yet; use "
                               "--cache off", "cache", "invalid_value")

    def reference_sizes(self, config: KontextConfig, req: EditRequest) -> tuple[tuple[int, int], ...]:
        """The size each reference is cropped to."""
        return tuple(reference_size(*img.size, token_side(config))[1] for img in req.images)

    def output_size(self, config: KontextConfig, req: EditRequest) -> tuple[int, int]:
        """Explicit size if given; else the first reference's cropped size; else 1024x1024."""
        if req.width is not None:
            return req.width, req.height
        sizes = self.reference_sizes(config, req)
        return sizes[0] if sizes else (DEFAULT_SIZE, DEFAULT_SIZE)

    def encode_prompts(self, k: Kontext, prompts: list[str]) -> Prompt:
        """Each prompt as a user message through the chat template (generation prompt on, thinking off), padded to
        512 tokens; the text encoder stacks three layers' hidden states into (B, 512, 3 * Dq)."""
        ids, masks = [], []
        for prompt in prompts:
            message = [{"role": "user", "content": cut(prompt, TEXT_LEN)}]
            text = k.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True,
                                                   enable_thinking=False)
            tokens = k.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=TEXT_LEN)
            if tokens["attention_mask"][0, -1] and len(k.tokenizer(text)["input_ids"]) > TEXT_LEN:
                log.warning("a prompt is longer than the text encoder's %d tokens; it was truncated", TEXT_LEN)
            ids.append(tokens["input_ids"])
            masks.append(tokens["attention_mask"])
        out = k.run("text_encoder", input_ids=torch.cat(ids).to(torch.int64).to(k.device),
                    attention_mask=torch.cat(masks).to(torch.int64).to(k.device))
        return Prompt(text=out["text_embeddings"].float(), pooled=None)

    def encode_context(self, k: Kontext, images: list[Image.Image], auto_resize: bool = True) -> Context:
        """Each reference resized to at most 1 MP (LANCZOS), center-cropped to the multiple, VAE-encoded on its own;
        tokens concatenated in order, reference i at t = 10 * (i + 1). auto_resize has no effect on klein."""
        tokens, ids, sizes = [], [], []
        for i, image in enumerate(images):
            pixels = reference_pixels(image, self.multiple(k))
            latent = k.run("vae_encoder", images=pixels.to(k.device))["latent"]
            tokens.append(pack(latent.float()))
            ids.append(grid_ids(REFERENCE_T * (i + 1), *latent.shape[-2:]))
            sizes.append((pixels.shape[3], pixels.shape[2]))
        return Context(torch.cat(tokens, dim=1), torch.cat(ids).to(k.device), *sizes[0])

    def noise(self, k: Kontext, batch: int, width: int, height: int, seed: int) -> torch.Tensor:
        """Packed (B, N, 4C) noise drawn as (B, 4C, h/2, w/2) from manual_seed(seed) on the CPU, as diffusers."""
        m = self.multiple(k)
        shape = (batch, 4 * k.config.latent_channels, height // m, width // m)
        x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        return pack(x)

    def target_ids(self, k: Kontext, width: int, height: int) -> torch.Tensor:
        """(N, 4) ids [0, row, col, 0] of the target tokens."""
        return grid_ids(0, height // self.multiple(k), width // self.multiple(k))

    def text_ids(self, k: Kontext, length: int) -> torch.Tensor:
        """(L, 4) ids [0, 0, 0, l]: text tokens are placed along the fourth axis."""
        ids = torch.zeros(length, 4)
        ids[:, 3] = torch.arange(length)
        return ids

    def schedule(self, k: Kontext, steps: int, n_tokens: int) -> torch.Tensor:
        """The empirical-mu sigmas."""
        return klein_schedule(steps, n_tokens, k.config.shift)

    def guidance(self, k: Kontext, req: EditRequest) -> float:
        """Klein has no guidance embedding (its transformer takes none)."""
        return 0.0

    def cfg(self, k: Kontext, req: EditRequest) -> tuple[str, float] | None:
        """True CFG on base checkpoints with --guidance above 1, against the empty prompt (or --negative-prompt)."""
        if k.config.distilled or req.guidance <= 1:
            return None
        return (req.negative_prompt or ""), req.guidance

    def transformer_inputs(self, k: Kontext, prompt: Prompt, hidden: torch.Tensor, t: torch.Tensor,
                           ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor) -> dict:
        """The transformer's named inputs of one step; the timestep rounded through t * 1000 / 1000 in float32 as
        diffusers hands it over."""
        return dict(hidden_states=hidden, encoder_hidden_states=prompt.text, timestep=(t * 1000) / 1000,
                    img_ids=ids, txt_ids=txt_ids)

    def decode(self, k: Kontext, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(B, N, 4C) tokens back to the (B, 4C, h/2, w/2) grid, VAE-decoded (the stage undoes the batch norm and
        the 2x2 patchify) to (B, 3, H, W) in [-1, 1]."""
        m = self.multiple(k)
        latents = x.reshape(x.shape[0], height // m, width // m, x.shape[2]).permute(0, 3, 1, 2)
        return k.run("vae_decoder", latent=latents)["images"].float()
