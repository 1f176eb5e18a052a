"""The Python API, in diffusers' words: KontextPipeline.load(...) then pipe(prompt=..., image=...).images, and
pipe.session(image).edit("add a hat") for multi-turn editing. The CLI and the server run the same calls, and the
same safety policy: every input and output is checked (NudeNet by default), outputs are watermarked, and a flagged
image raises ContentFlagged (a KontextError carrying the verdicts)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.checks import pick_device
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import CacheSpec, LoadSpec, parse_cache
from kontext_trt.runtime.flow import Context, EditRequest, EditResult, Kontext, PipelineInfo, Prompt, check_request
from kontext_trt.runtime.session import EditSession
from kontext_trt.safety import guard


def as_image(image: Image.Image | str | Path | None) -> Image.Image | None:
    """A PIL image from an image or a path (checked and loaded as the CLI does)."""
    if image is None or isinstance(image, Image.Image):
        return image
    return im.load_image(Path(image))


class KontextPipeline:
    """A loaded FLUX.1 Kontext pipeline on one backend and its output policy: call it to edit (or generate), or open
    a session; `save` writes results (C2PA-signed when the policy has credentials)."""

    def __init__(self, kontext: Kontext, policy: guard.OutputPolicy) -> None:
        self.kontext, self.policy = kontext, policy

    @classmethod
    def load(cls, model: str | Path | None = None, *, engines: str | Path | None = None,
             onnx: str | Path | None = None, device: str | None = None, dtype: str = "bf16",
             cuda_graphs: bool = False, safety_checker: str = "nudenet", c2pa_cert: str | Path | None = None,
             c2pa_key: str | Path | None = None, **options) -> "KontextPipeline":
        """Load a checkpoint folder (torch), an export folder (`onnx=`: onnxruntime) or an engine cache (`engines=`:
        TensorRT on this GPU; `onnx=` or `model` then only supply tokenizers and config). device defaults to cuda when
        available, else cpu; safety_checker is nudenet, none (the license then obliges you to review outputs) or
        module:callable, as the CLI's --safety-checker; options are LoadSpec's other fields (precision, sku,
        low_vram, weight_budget, loras, cache: a step-cache spec, whose parts engines then load)."""
        device = pick_device(device)
        policy = guard.OutputPolicy.from_options(safety_checker, as_path(c2pa_cert), as_path(c2pa_key), device)
        backend = "onnxruntime" if onnx is not None and engines is None and model is None else "torch"
        if isinstance(options.get("cache"), str):
            options["cache"] = parse_cache(options["cache"])
        spec = LoadSpec(as_path(model), backend=backend, dtype=dtype, device=device, onnx=as_path(onnx),
                        engines=as_path(engines), cuda_graphs=cuda_graphs, **options)
        k = build_pipeline(spec)
        return cls(k, policy)

    def __call__(self, prompt: str | list[str], image: Image.Image | str | Path | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, generator_seed: int = 0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 true_cfg_scale: float = 1.0, auto_resize: bool = True, cache: str | CacheSpec = "off",
                 images: list[Image.Image | str | Path] | None = None) -> EditResult:
        """Edit `image` with `prompt` (text-to-image without an image); a list of prompts is a batch on one image;
        `images=[...]` gives several reference images in order instead (FLUX.2 [klein]: up to 4; on a base klein
        checkpoint guidance_scale is the CFG scale); guidance_scale None is the family's default (FLUX.1 2.5, klein
        4.0), num_inference_steps None the model's (FLUX.1 28; klein 4 step-distilled, 50 base; the result's
        metadata["steps"] records it); `cache` is a step cache (off, fbcache:T, teacache:T). The result
        has .images (PIL, watermarked), .latents and .metadata (with the safety verdicts), as `kontext-trt edit`
        writes them; a flagged input or output raises ContentFlagged."""
        req = self.request(prompt, image, num_inference_steps, guidance_scale, generator_seed, height, width,
                           negative_prompt, true_cfg_scale, auto_resize, cache, images)
        return guard.edit(self.kontext, req, self.policy)

    def request(self, prompt: str | list[str], image: Image.Image | str | Path | None = None,
                num_inference_steps: int | None = None, guidance_scale: float | None = None, generator_seed: int = 0,
                height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                true_cfg_scale: float = 1.0, auto_resize: bool = True, cache: str | CacheSpec = "off",
                images: list[Image.Image | str | Path] | None = None) -> EditRequest:
        """The EditRequest a call makes, checked."""
        if images is not None and image is not None:
            raise KontextError("pass image= (one reference) or images=[...] (several), not both", "image")
        refs = [as_image(img) for img in images] if images is not None else [] if image is None else [as_image(image)]
        req = EditRequest(prompts=[prompt] if isinstance(prompt, str) else list(prompt),
                          image=refs[0] if refs else None, references=refs[1:], width=width, height=height,
                          steps=num_inference_steps, guidance=guidance_scale, seed=generator_seed,
                          auto_resize=auto_resize, negative_prompt=negative_prompt, true_cfg=true_cfg_scale,
                          cache=cache if isinstance(cache, CacheSpec) else parse_cache(cache))
        check_request(req)
        return req

    def run(self, req: EditRequest, prompt: Prompt | None = None, context: Context | None = None) -> EditResult:
        """One EditRequest under the pipeline's output policy (what the CLI's `edit` runs)."""
        return guard.edit(self.kontext, req, self.policy, prompt, context)

    def session(self, image: Image.Image | str | Path | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, generator_seed: int = 0, auto_resize: bool = True,
                images: list[Image.Image | str | Path] | None = None) -> EditSession:
        """Multi-turn editing from `image`: session.edit("add a hat") edits the current image and makes the result
        current; prompt encodings and input latents are cached across turns; every turn is checked and marked.
        `images=[...]` (FLUX.2 [klein]) starts from several references: each turn's output replaces the first, the
        others stay. num_inference_steps and guidance_scale None: the model's defaults, as in __call__."""
        if images is not None and image is not None:
            raise KontextError("pass image= (one reference) or images=[...] (several), not both", "image")
        refs = [as_image(img) for img in images] if images is not None else [as_image(image)]
        return EditSession(self.kontext, refs[0] if refs else None, references=refs[1:],
                           run_edit=lambda k, req, p, c: self.run(req, p, c), steps=num_inference_steps,
                           guidance=guidance_scale, seed=generator_seed, auto_resize=auto_resize)

    def save(self, result: EditResult, out: str | Path) -> list[Path]:
        """Write a result's images as `kontext-trt edit` does (metadata chunks; a C2PA manifest with credentials)."""
        return guard.save(result, out, self.policy, self.kontext.times)

    @property
    def info(self) -> PipelineInfo:
        """What the pipeline runs on: backend, dtype, precision, checkpoint, source, memory mode."""
        return self.kontext.info


def as_path(value: str | Path | None) -> Path | None:
    """A Path, or None."""
    return None if value is None else Path(value)
