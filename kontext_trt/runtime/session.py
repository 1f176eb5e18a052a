"""Multi-turn editing: each output becomes the next input; prompt encodings and input latents are cached. With
several references (FLUX.2 [klein]) the output replaces the first one and the others stay, in order, every turn
(docs/klein.md)."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Callable

from PIL import Image

from kontext_trt.core.errors import KontextError
from kontext_trt.runtime.flow import (
    Context,
    EditRequest,
    EditResult,
    Kontext,
    Prompt,
    edit,
    encode_context,
    encode_prompts,
    request,
)

# What runs one turn: flow.edit, or safety.guard's edit (input check, output check and watermark) around it.
EditFn = Callable[[Kontext, EditRequest, Prompt, Context | None], EditResult]
from kontext_trt.core.lru import LruCache


def image_key(image: Image.Image, auto_resize: bool) -> str:
    """Content hash of an image (and the resize mode), the key of the input-latent cache."""
    return hashlib.sha256(image.tobytes() + f"{image.size}{auto_resize}".encode()).hexdigest()


class EditSession:
    """Refine one image through several instructions; `edit(prompt)` is one call per turn, run by `run_edit`.
    `references` are further reference images after `image` (klein): every turn keeps them, after the current
    image."""

    def __init__(self, k: Kontext, image: Image.Image | None = None, cache_size: int = 32, run_edit: EditFn = edit,
                 references: list[Image.Image] = (), **defaults) -> None:
        self.k, self.image, self.run_edit, self.defaults = k, image, run_edit, defaults
        self.references = list(references)
        if self.references and image is None:
            raise KontextError("a session's references need a first image: pass the images as one list", "image",
                               "missing_argument")
        self.prompts: LruCache = LruCache(cache_size)
        self.contexts: LruCache = LruCache(cache_size)
        self.history: list[tuple[str, Image.Image]] = []

    def prompt(self, prompts: list[str]) -> Prompt:
        """Encoded prompts, from the cache when this exact list was seen before."""
        return self.prompts.get_or_make(tuple(prompts), lambda: encode_prompts(self.k, prompts))

    def context(self, images: Image.Image | list[Image.Image], auto_resize: bool) -> Context:
        """Encoded input image(s), from the cache when these pixels (in this order) were seen before."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        return self.contexts.get_or_make("/".join(image_key(image, auto_resize) for image in images),
                                         lambda: encode_context(self.k, images, auto_resize))

    def run(self, req: EditRequest) -> EditResult:
        """Run a request through the caches."""
        context = None if req.image is None else self.context(req.images, req.auto_resize)
        return self.run_edit(self.k, req, self.prompt(req.prompts), context)

    def edit(self, prompt: str | list[str], **overrides) -> EditResult:
        """Edit the current image and the kept references (text-to-image on the first turn if none), then make the
        output current."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = [] if self.image is None else [self.image, *self.references]
        req = replace(request(prompts, images), **{**self.defaults, **overrides})
        result = self.run(req)
        self.image = result.images[0]
        self.history.append((prompts[0], self.image))
        return result
