"""The flow-matching loop, once, over any backend's stages (named tensors in and out) and any model family: where
FLUX.1 Kontext and FLUX.2 [klein] differ (text encoding, references, latent packing and ids, schedule, guidance,
decoding), the loop calls its family's functions (runtime/families.py, runtime/klein.py)."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from kontext_trt.core import checks
from kontext_trt.core import image as im
from kontext_trt.core.errors import Cancelled, KontextError
from kontext_trt.core.family import MAX_REFERENCES
from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.stages import Stage
from kontext_trt.core.timing import StageTimes, bar
from kontext_trt.runtime.families import family_ops
from kontext_trt.runtime.inputs import Context, KontextConfig, Prompt, concat_contexts, concat_prompts
from kontext_trt.runtime.step_cache import StepCache, step_cache, uncached_report

__all__ = ["Context", "KontextConfig", "Prompt", "concat_contexts", "concat_prompts"]  # re-exported (runtime.inputs)
ops_of = lru_cache(maxsize=None)(family_ops)


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline runs on, the same keys for every backend; goes into image metadata and benchmark targets."""

    backend: str  # torch, onnxruntime, tensorrt or tensorrt-rtx
    dtype: str  # the stages' compute dtype: bf16, fp32 (an export of mixed stages: "bf16,fp32")
    precision: str  # the transformer's weight format: bf16, fp32, fp8, nvfp4
    checkpoint: str | None  # first 16 hex digits of the checkpoint fingerprint
    source: str  # the checkpoint, export or engine folder the stages came from
    memory_mode: str = "resident"  # TensorRT: resident, low-vram, weight-streaming or both
    cuda_graphs: bool = False
    loras: tuple[dict, ...] = ()  # the transformer's LoRAs, {"file", "scale"} each (Kontext.set_loras)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class Kontext:
    """A ready pipeline: its stages, its tokenizers (FLUX.1: CLIP's and T5's; klein: Qwen's and None), the config and
    where the loop's tensors live.

    Made by assemble.build_pipeline; `graphs` holds CUDA-graphed stand-ins the loop calls in place of those stages."""

    stages: dict[str, Stage]
    tokenizer: object
    tokenizer_2: object
    config: KontextConfig
    device: torch.device
    info: PipelineInfo
    graphs: dict[str, Stage] = field(default_factory=dict)
    times: StageTimes = field(default_factory=StageTimes)
    lora_refusal: str | None = None  # why the step-cache parts cannot take the LoRAs set (step caching refuses)

    @property
    def ops(self):
        """The loop functions of this pipeline's model family (runtime.families)."""
        return ops_of(self.config.family)

    def run(self, stage: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Call one stage (its CUDA-graphed stand-in if it has one), timing it."""
        with self.times(stage, self.device):
            return self.graphs.get(stage, self.stages[stage])(**inputs)

    def reset_times(self) -> StageTimes:
        """Start timing afresh; returns the times recorded so far."""
        done, self.times = self.times, StageTimes()
        return done

    def with_stages(self, **stages: Stage) -> "Kontext":
        """A pipeline sharing everything with this one but these stages (and its own times)."""
        return replace(self, stages={**self.stages, **stages}, times=StageTimes(),
                       graphs={name: g for name, g in self.graphs.items() if name not in stages})

    def with_graphs(self, graphs: dict[str, Stage]) -> "Kontext":
        """A pipeline sharing this one's stages that calls these graphed stand-ins instead (see runtime.pipeline)."""
        return replace(self, graphs=graphs, times=StageTimes(), info=replace(self.info, cuda_graphs=bool(graphs)))

    def set_loras(self, loras: list[tuple[str | Path, float]]) -> None:
        """Swap the transformer's LoRAs, [(file or folder, scale), ...]; [] restores the base weights exactly. They
        reach the single transformer and its step-cache parts alike (TensorRT engines by refit: engines.trt_refit)."""
        from kontext_trt.runtime.lora import apply_loras, transformer_targets

        targets, left_out = transformer_targets(self.stages)
        applied = apply_loras(targets, loras)  # in place: graphs replaying the stages stay valid
        self.lora_refusal = left_out if applied else None
        self.info = replace(self.info, loras=tuple(lora.describe() for lora in applied))


@dataclass
class EditRequest:
    """One edit (or text-to-image when image is None); a batch is several prompts on the same references. `image` is
    the first reference image, `references` the further ones in order (FLUX.2 [klein]: up to 4 in all); `images` is
    them all."""

    prompts: list[str]
    image: Image.Image | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None  # None: the model's default (FLUX.1 28; klein 4 distilled, 50 base), see with_defaults
    guidance: float | None = None  # None: the family's default_guidance (FLUX.1 2.5, klein 4.0), see with_defaults
    seed: int = 0
    auto_resize: bool = True
    negative_prompt: str | None = None
    true_cfg: float = 1.0
    cache: CacheSpec = field(default_factory=CacheSpec)  # step caching (core/specs.py, runtime/step_cache.py)
    lora: str | None = None  # serve only: NAME[:SCALE],... of the server's --lora-dir, applied by serve/service.py
    cancel: threading.Event | None = None  # set from any thread to stop the edit between steps (see `stopper`)
    references: list[Image.Image] = field(default_factory=list)  # reference images after `image`, in order

    @property
    def images(self) -> list[Image.Image]:
        """Every reference image, in order: `image`, then `references`."""
        return [] if self.image is None else [self.image, *self.references]


def request(prompts: list[str], images: list[Image.Image] | None = None, **fields) -> EditRequest:
    """An EditRequest on a list of reference images (first one `image`, the rest `references`)."""
    images = list(images or [])
    return EditRequest(prompts=prompts, image=images[0] if images else None, references=images[1:], **fields)


@dataclass
class EditResult:
    """Output images, the final packed latents (B, N, 64) float32, and the size; from edit_batch(to_images=False),
    the decoded pixels (B, 3, H, W) in [-1, 1] instead of images, until `with_images`."""

    images: list[Image.Image]
    latents: torch.Tensor
    width: int
    height: int
    metadata: dict
    pixels: torch.Tensor | None = None


def with_images(result: EditResult) -> EditResult:
    """A result with its decoded pixels made images (the server does this off its model thread)."""
    if result.pixels is None:
        return result
    return replace(result, images=im.tensor_to_images(result.pixels), pixels=None)


def encode_prompts(k: Kontext, prompts: list[str]) -> Prompt:
    """The family's text encoding of a list of prompts (FLUX.1: CLIP pooled + T5; klein: Qwen3 layers)."""
    return k.ops.encode_prompts(k, prompts)


def encode_context(k: Kontext, images: Image.Image | list[Image.Image], auto_resize: bool = True) -> Context:
    """The family's encoding of the reference image(s): resized, VAE-encoded, packed, with their ids."""
    return k.ops.encode_context(k, [images] if isinstance(images, Image.Image) else list(images), auto_resize)


def denoise(k: Kontext, x: torch.Tensor, ids: torch.Tensor, prompt: Prompt, sigmas: torch.Tensor,
            guidance: torch.Tensor, context: Context | None = None, negative: Prompt | None = None,
            true_cfg: float | torch.Tensor = 1.0, cache: StepCache | None = None,
            stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Euler steps over sigmas in float32: x += (s_next - s) * v, v the transformer's first N tokens; with a step
    cache the split transformer runs and the cache's policy decides which steps reuse the body's residual.
    `stop` (host only, no device sync) is asked before each step: True raises Cancelled.

    guidance is (B,) float32, one value per batch item; context tokens are (1 or B, M, C); true_cfg a scale or a
    (B, 1, 1) tensor of one per batch item."""
    batch, n = x.shape[:2]
    guidance_t = guidance.to(device=k.device, dtype=torch.float32)
    txt_ids = k.ops.text_ids(k, prompt.text.shape[1]).to(k.device)
    ctx = None if context is None else context.tokens.expand(batch, -1, -1)

    def velocity(p: Prompt, hidden: torch.Tensor, t: torch.Tensor, step: int, branch: int) -> torch.Tensor:
        inputs = k.ops.transformer_inputs(k, p, hidden, t, ids, txt_ids, guidance_t)
        if cache is not None:
            return cache.velocity(k, step, branch, inputs)[:, :n].float()
        return k.run("transformer", **inputs)["latent"][:, :n].float()

    steps = bar(zip(sigmas[:-1], sigmas[1:]), "denoising", total=len(sigmas) - 1, unit="step")
    for step, (s, s_next) in enumerate(steps):
        if stop is not None and stop():
            raise Cancelled(f"the edit was cancelled after {step} of {len(sigmas) - 1} steps")
        hidden = x if ctx is None else torch.cat([x, ctx], dim=1)
        t = s.expand(batch).to(k.device)
        v = velocity(prompt, hidden, t, step, 0)
        if negative is not None:
            v_neg = velocity(negative, hidden, t, step, 1)
            v = v_neg + true_cfg * (v - v_neg)
        x = x + (s_next - s) * v
    return x


def decode(k: Kontext, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The family's decoding of (B, N, C) latents to (B, 3, H, W) pixels in [-1, 1]."""
    return k.ops.decode(k, x, width, height)


def check_request(req: EditRequest) -> None:
    """Refuse requests the loop cannot run, with one line each naming the request field at fault (param) and a
    code."""
    if not req.prompts:
        raise KontextError("no prompt given: pass --prompt \"what to change\"", "prompt", "missing_argument")
    if req.steps is not None and req.steps < 1:
        raise KontextError(f"steps must be at least 1, got {req.steps}", "steps", "out_of_range")
    if (req.width is None) != (req.height is None):
        raise KontextError("give both --width and --height, or neither", "width" if req.width is None else "height",
                           "missing_argument")
    if req.width is not None:
        im.check_size(req.width, req.height)
    if req.guidance is not None:
        checks.check_finite("--guidance", req.guidance)
    checks.check_finite("--true-cfg", req.true_cfg)
    if req.true_cfg > 1 and req.negative_prompt is None:
        raise KontextError(f"--true-cfg {req.true_cfg} needs a --negative-prompt to push away from: add one, or drop "
                           "--true-cfg", "true_cfg", "invalid_value")
    checks.check_seed(req.seed)
    for prompt in req.prompts:
        checks.check_text("--prompt", prompt)
    if req.negative_prompt is not None:
        checks.check_text("--negative-prompt", req.negative_prompt)
    if req.references and req.image is None:
        raise KontextError("references were given without a first image: pass the images as one list", "image",
                           "missing_argument")
    if len(req.images) > MAX_REFERENCES:
        raise KontextError(f"{len(req.images)} reference images were given; at most {MAX_REFERENCES} are taken (by "
                           "FLUX.2 [klein]; FLUX.1 Kontext takes one): pass fewer --image", "image", "out_of_range")


def stopper(reqs: list[EditRequest]) -> Callable[[], bool] | None:
    """The batch's cancellation check: True once every request's `cancel` event is set (None when a request has
    none). A batch with only some requests cancelled runs on for the others; the server drops the cancelled ones'
    results."""
    events = [req.cancel for req in reqs]
    if any(event is None for event in events):
        return None
    return lambda: all(event.is_set() for event in events)


def edit(k: Kontext, req: EditRequest, prompt: Prompt | None = None, context: Context | None = None) -> EditResult:
    """Run one request end to end; prompt and context may come from a cache (see session.py)."""
    return edit_batch(k, [req], [prompt], [context])[0]


def default_steps(k: Kontext) -> int:
    """The denoising steps a request that gives none runs on pipeline k: its family's count for its checkpoint
    (Family.steps: FLUX.1 28; klein 4 step-distilled, 50 base)."""
    return k.ops.family.steps(k.config.distilled)


def with_defaults(k: Kontext, req: EditRequest) -> EditRequest:
    """The request with what it left to the model family filled in: guidance (Family.default_guidance) and steps
    (default_steps)."""
    filled = {}
    if req.guidance is None:
        filled["guidance"] = k.ops.family.default_guidance
    if req.steps is None:
        filled["steps"] = default_steps(k)
    return replace(req, **filled) if filled else req


def batch_key(k: Kontext, req: EditRequest) -> tuple:
    """What requests must share to run as one batch on pipeline k: output size, each reference's processed size,
    steps, the CFG pass and its scale (FLUX.1: --true-cfg with a negative prompt; klein base: the guidance scale),
    the step cache (one policy decides for the whole batch) and the server's LoRA set (one transformer weight
    set)."""
    req = with_defaults(k, req)
    cfg = k.ops.cfg(k, req)
    return (k.ops.output_size(k.config, req), k.ops.reference_sizes(k.config, req), req.steps, cfg and cfg[1],
            req.cache, req.lora)


def edit_batch(k: Kontext, reqs: list[EditRequest], prompts: list[Prompt | None] | None = None,
               contexts: list[Context | None] | None = None, to_images: bool = True) -> list[EditResult]:
    """Run requests sharing a batch_key through the loop at once, one result per request. Each request keeps its own
    seed (its noise drawn from its own generator, exactly as when it runs alone) and its own guidance. to_images=False
    leaves the decoded pixels for `with_images` to convert later, on another thread."""
    reqs = [with_defaults(k, req) for req in reqs]
    for req in reqs:
        check_request(req)
        k.ops.check(k, req)
    contexts = [c if c is not None or r.image is None else encode_context(k, r.images, r.auto_resize)
                for r, c in zip(reqs, contexts or [None] * len(reqs))]
    prompts = [p or encode_prompts(k, r.prompts) for r, p in zip(reqs, prompts or [None] * len(reqs))]
    if len({batch_key(k, r) for r in reqs}) != 1:
        raise KontextError("requests of one batch must share output size, reference sizes, steps, CFG, cache and "
                           "LoRA set")
    width, height = k.ops.output_size(k.config, reqs[0])
    steps, cache_spec = reqs[0].steps, reqs[0].cache
    sizes = [len(r.prompts) for r in reqs]
    prompt = concat_prompts(prompts)
    cfgs = [k.ops.cfg(k, r) for r in reqs]
    negative, true_cfg = None, 1.0
    if any(cfg is not None for cfg in cfgs):
        if not all(cfg is not None for cfg in cfgs):
            raise KontextError("requests of one batch must all run true CFG or none")
        negative = concat_prompts([encode_prompts(k, [neg] * n) for (neg, _), n in zip(cfgs, sizes)])
        scales = [scale for (_, scale), n in zip(cfgs, sizes) for _ in range(n)]
        true_cfg = torch.tensor(scales, dtype=torch.float32, device=k.device).view(-1, 1, 1)
    context = concat_contexts(contexts, sizes)
    x = torch.cat([k.ops.noise(k, n, width, height, r.seed) for r, n in zip(reqs, sizes)]).to(k.device)
    ids = k.ops.target_ids(k, width, height).to(k.device)
    if context is not None:
        ids = torch.cat([ids, context.ids], dim=0)
    sigmas = k.ops.schedule(k, steps, x.shape[1]).to(k.device)
    guidance = torch.tensor([k.ops.guidance(k, r) for r, n in zip(reqs, sizes) for _ in range(n)],
                            dtype=torch.float32)
    cache = step_cache(k, cache_spec, steps)
    stop = stopper(reqs)
    x = denoise(k, x, ids, prompt, sigmas, guidance, context, negative, true_cfg, cache, stop)
    if stop is not None and stop():
        raise Cancelled(f"the edit was cancelled after its {steps} steps, before decoding")
    pixels = decode(k, x, width, height)
    report = uncached_report(steps) if cache is None else cache.report()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    results = [EditResult([], x[s:s + n], width, height, metadata(k, r, width, height, report), pixels[s:s + n])
               for r, s, n in zip(reqs, starts, sizes)]
    if not to_images:
        return results
    images = im.tensor_to_images(pixels)
    return [replace(result, images=images[s:s + n], pixels=None) for result, s, n in zip(results, starts, sizes)]


def metadata(k: Kontext, req: EditRequest, width: int, height: int, cache: dict | None = None) -> dict:
    """What produced an image: prompt, seed, steps, guidance, size, text length, model family, step cache, backend
    and checkpoint."""
    return {"prompts": req.prompts, "negative_prompt": req.negative_prompt, "true_cfg": req.true_cfg, "seed": req.seed,
            "steps": req.steps, "guidance": req.guidance, "width": width, "height": height,
            "auto_resize": req.auto_resize, "edited": req.image is not None, "text_length": k.config.text_length,
            "family": k.config.family,
            **({"references": len(req.images)} if len(req.images) > 1 else {}),
            "cache": cache or uncached_report(req.steps), **k.info.to_dict()}


def image_metadata(result: EditResult) -> list[dict]:
    """The metadata of each image of a result: the request's, with its own prompt and its own safety verdict."""
    common = {key: value for key, value in result.metadata.items() if key != "prompts"}
    metas = [{**common, "prompt": prompt} for prompt in result.metadata["prompts"]]
    safety = common.get("safety") or {}
    if safety.get("outputs"):
        shared = {key: value for key, value in safety.items() if key != "outputs"}
        metas = [{**meta, "safety": {**shared, "output": verdict}} for meta, verdict in zip(metas, safety["outputs"])]
    return metas


def save_images(result: EditResult, out: str | Path,
                finish: Callable[[bytes, Path], bytes] | None = None) -> list[Path]:
    """Write out for one image, out-0.png, out-1.png ... for a batch (format from the suffix), each with its metadata;
    `finish` may rewrite each encoded file before it is written (C2PA signing)."""
    out = Path(out)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}")
                                                   for i in range(len(result.images))]
    return [im.save_image(img, path, meta, finish)
            for img, path, meta in zip(result.images, paths, image_metadata(result))]
