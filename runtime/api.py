"""The Python API, in diffusers' words: KontextPipeline.load(...) then pipe(prompt=..., image=...).images, and
pipe.session(image).edit("add a hat") for multi-turn editing. The CLI and the server run the same calls."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from kontext_trt.runtime import flow, image as im
from kontext_trt.runtime.flow import EditRequest, EditResult, Kontext
from kontext_trt.runtime.pipeline import load_kontext
from kontext_trt.runtime.session import EditSession


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_image(image: Image.Image | str | Path | None) -> Image.Image | None:
    """A PIL image from an image or a path (checked and loaded as the CLI does)."""
    if image is None or isinstance(image, Image.Image):
        return image
    return im.load_image(Path(image))


class KontextPipeline:
    """A loaded FLUX.1 Kontext pipeline on one backend: call it to edit (or generate), or open a session."""

    def __init__(self, kontext: Kontext) -> None:
        self.kontext = kontext

    @classmethod
    def load(cls, model: str | Path | None = None, *, engines: str | Path | None = None,
             onnx: str | Path | None = None, device: str | None = None, dtype: str = "bf16",
             cuda_graphs: bool = False, **options) -> "KontextPipeline":
        """Load a checkpoint folder (torch), an export folder (`onnx=`: onnxruntime) or an engine cache (`engines=`:
        TensorRT on this GPU; `onnx=` or `model` then only supply tokenizers and config). device defaults to cuda when
        available, else cpu; options are runtime.pipeline.load_kontext's (precision, sku, low_vram, weight_budget,
        loras)."""
        backend = "onnxruntime" if onnx is not None and engines is None and model is None else "torch"
        k = load_kontext(Path(model) if model is not None else None, backend=backend, dtype=dtype,
                         device=device or default_device(), onnx=Path(onnx) if onnx is not None else None,
                         engines=Path(engines) if engines is not None else None, cuda_graphs=cuda_graphs, **options)
        return cls(k)

    def __call__(self, prompt: str | list[str], image: Image.Image | str | Path | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 2.5, generator_seed: int = 0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 true_cfg_scale: float = 1.0, auto_resize: bool = True) -> EditResult:
        """Edit `image` with `prompt` (text-to-image without an image); a list of prompts is a batch on one image.
        The result has .images (PIL), .latents and .metadata, as `kontext-trt edit` writes them."""
        req = self.request(prompt, image, num_inference_steps, guidance_scale, generator_seed, height, width,
                           negative_prompt, true_cfg_scale, auto_resize)
        return flow.edit(self.kontext, req)

    def request(self, prompt: str | list[str], image: Image.Image | str | Path | None = None,
                num_inference_steps: int = 28, guidance_scale: float = 2.5, generator_seed: int = 0,
                height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                true_cfg_scale: float = 1.0, auto_resize: bool = True) -> EditRequest:
        """The EditRequest a call makes, checked."""
        req = EditRequest(prompts=[prompt] if isinstance(prompt, str) else list(prompt), image=as_image(image),
                          width=width, height=height, steps=num_inference_steps, guidance=guidance_scale,
                          seed=generator_seed, auto_resize=auto_resize, negative_prompt=negative_prompt,
                          true_cfg=true_cfg_scale)
        flow.check_request(req)
        return req

    def session(self, image: Image.Image | str | Path | None = None, num_inference_steps: int = 28,
                guidance_scale: float = 2.5, generator_seed: int = 0, auto_resize: bool = True) -> EditSession:
        """Multi-turn editing from `image`: session.edit("add a hat") edits the current image and makes the result
        current; prompt encodings and input latents are cached across turns."""
        return EditSession(self.kontext, as_image(image), steps=num_inference_steps, guidance=guidance_scale,
                           seed=generator_seed, auto_resize=auto_resize)

    @property
    def info(self) -> flow.PipelineInfo:
        """What the pipeline runs on: backend, dtype, precision, checkpoint, source, memory mode."""
        return self.kontext.info
