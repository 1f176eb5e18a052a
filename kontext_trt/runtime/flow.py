"""The Kontext flow-matching loop, once, over any backend's five stages (named tensors in and out)."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from kontext_trt.core import checks
from kontext_trt.core import image as im
from kontext_trt.core.errors import Cancelled, KontextError
from kontext_trt.core.flux_constants import LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.stages import Stage
from kontext_trt.core.text import CLIP_LEN, T5_MAX_LEN, tokenize
from kontext_trt.core.timing import StageTimes, bar
from kontext_trt.runtime.latents import draw_noise, latent_ids, pack_latents, text_ids, unpack_latents
from kontext_trt.runtime.schedule import ShiftConfig, flow_schedule
from kontext_trt.runtime.step_cache import StepCache, step_cache, uncached_report


@dataclass(frozen=True)
class KontextConfig:
    """What the loop needs to know of a checkpoint beyond its stages."""

    latent_channels: int = LATENT_CHANNELS
    vae_scale: float = VAE_SCALING_FACTOR
    vae_shift: float = VAE_SHIFT_FACTOR
    guidance_embeds: bool = True
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    text_length: int = T5_MAX_LEN  # T5 tokens a prompt is padded to (manifests written before it existed: 512)

    def to_dict(self) -> dict:
        """A JSON-ready dict (written into export and engine manifests)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KontextConfig":
        """The inverse of to_dict."""
        return cls(**{**data, "shift": ShiftConfig(**data["shift"])})

    @classmethod
    def from_checkpoint(cls, ckpt) -> "KontextConfig":
        """Read latent channels, VAE scale/shift, guidance, the shift line and the T5 text length (tokenizer_2's
        model_max_length, core.checkpoint) from a checkpoint's configs."""
        sched = ckpt.scheduler_config
        return cls(
            latent_channels=ckpt.vae_config["latent_channels"],
            vae_scale=ckpt.vae_config["scaling_factor"],
            vae_shift=ckpt.vae_config["shift_factor"],
            guidance_embeds=bool(ckpt.transformer_config.get("guidance_embeds", False)),
            shift=ShiftConfig.from_scheduler_config(sched),
            text_length=ckpt.text_length,
        )


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
    """A ready pipeline: five stages, the two tokenizers, the config and where the loop's tensors live.

    Made by runtime.pipeline; `graphs` holds CUDA-graphed stand-ins the loop calls in place of those stages."""

    stages: dict[str, Stage]
    clip_tokenizer: object
    t5_tokenizer: object
    config: KontextConfig
    device: torch.device
    info: PipelineInfo
    graphs: dict[str, Stage] = field(default_factory=dict)
    times: StageTimes = field(default_factory=StageTimes)
    lora_refusal: str | None = None  # why the step-cache parts cannot take the LoRAs set (step caching refuses)

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


@dataclass(frozen=True)
class Prompt:
    """Encoded prompts: T5 hidden states (B, text_length, Dt) and CLIP pooled (B, Dc), float32 on the loop device."""

    text: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class Context:
    """An encoded input image: packed, scaled latents (1, M, 64) and their ids (M, 3) with index 1."""

    tokens: torch.Tensor
    ids: torch.Tensor
    width: int
    height: int


@dataclass
class EditRequest:
    """One edit (or text-to-image when image is None); a batch is several prompts on one image."""

    prompts: list[str]
    image: Image.Image | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 28
    guidance: float = 2.5
    seed: int = 0
    auto_resize: bool = True
    negative_prompt: str | None = None
    true_cfg: float = 1.0
    cache: CacheSpec = field(default_factory=CacheSpec)  # step caching (core/specs.py, runtime/step_cache.py)
    lora: str | None = None  # serve only: NAME[:SCALE],... of the server's --lora-dir, applied by serve/service.py
    cancel: threading.Event | None = None  # set from any thread to stop the edit between steps (see `stopper`)


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
    """CLIP pooled (77 tokens) and T5 hidden states (the config's text_length tokens) for a list of prompts."""
    clip_ids = tokenize(k.clip_tokenizer, prompts, CLIP_LEN, "CLIP").to(k.device)
    t5_ids = tokenize(k.t5_tokenizer, prompts, k.config.text_length, "T5").to(k.device)
    pooled = k.run("clip", input_ids=clip_ids)["pooled_embeddings"]
    text = k.run("t5", input_ids=t5_ids)["text_embeddings"]
    return Prompt(text=text.float(), pooled=pooled.float())


def encode_context(k: Kontext, image: Image.Image, auto_resize: bool = True) -> Context:
    """Resize the input image (bucket or own size, floored to 16), VAE-encode its mean, shift, scale, pack."""
    width, height = im.context_size(*image.size, auto_resize=auto_resize)
    im.check_size(width, height)
    pixels = im.image_to_tensor(image, width, height).to(k.device)
    mean = k.run("vae_encoder", images=pixels)["latent"].float()
    latents = (mean - k.config.vae_shift) * k.config.vae_scale
    h, w = latents.shape[-2:]
    return Context(pack_latents(latents), latent_ids(h, w, index=1).to(k.device), width, height)


def denoise(k: Kontext, x: torch.Tensor, ids: torch.Tensor, prompt: Prompt, sigmas: torch.Tensor,
            guidance: torch.Tensor, context: Context | None = None, negative: Prompt | None = None,
            true_cfg: float = 1.0, cache: StepCache | None = None,
            stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Euler steps over sigmas in float32: x += (s_next - s) * v, v the transformer's first N tokens; with a step
    cache the split transformer runs and the cache's policy decides which steps reuse the body's residual.
    `stop` (host only, no device sync) is asked before each step: True raises Cancelled.

    guidance is (B,) float32, one value per batch item; context tokens are (1 or B, M, 64)."""
    batch, n = x.shape[:2]
    guidance_t = guidance.to(device=k.device, dtype=torch.float32)
    txt_ids = text_ids(prompt.text.shape[1]).to(k.device)
    ctx = None if context is None else context.tokens.expand(batch, -1, -1)

    def velocity(p: Prompt, hidden: torch.Tensor, t: torch.Tensor, step: int, branch: int) -> torch.Tensor:
        inputs = dict(hidden_states=hidden, encoder_hidden_states=p.text, pooled_projections=p.pooled, timestep=t,
                      img_ids=ids, txt_ids=txt_ids, guidance=guidance_t)
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
        if negative is not None and true_cfg > 1:
            v_neg = velocity(negative, hidden, t, step, 1)
            v = v_neg + true_cfg * (v - v_neg)
        x = x + (s_next - s) * v
    return x


def decode(k: Kontext, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Unpack (B, N, 64) latents, undo scale and shift, VAE-decode to (B, 3, H, W) in [-1, 1]."""
    latents = unpack_latents(x, 2 * (height // 16), 2 * (width // 16))
    latents = latents / k.config.vae_scale + k.config.vae_shift
    return k.run("vae_decoder", latent=latents)["images"].float()


def check_request(req: EditRequest) -> None:
    """Refuse requests the loop cannot run, with one line each naming the request field at fault (param) and a
    code."""
    if not req.prompts:
        raise KontextError("no prompt given: pass --prompt \"what to change\"", "prompt", "missing_argument")
    if req.steps < 1:
        raise KontextError(f"steps must be at least 1, got {req.steps}", "steps", "out_of_range")
    if (req.width is None) != (req.height is None):
        raise KontextError("give both --width and --height, or neither", "width" if req.width is None else "height",
                           "missing_argument")
    if req.width is not None:
        im.check_size(req.width, req.height)
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
    if req.image is not None:
        im.check_context_size(*req.image.size, req.auto_resize)


def output_size(req: EditRequest, context_size: tuple[int, int] | None) -> tuple[int, int]:
    """Explicit size if given; else the resized input size (BFL's behaviour); else 1024x1024."""
    if req.width is not None:
        return req.width, req.height
    return context_size or (1024, 1024)


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


def batch_key(req: EditRequest) -> tuple:
    """What requests must share to run as one batch: output size, input image size, steps, the true-CFG pass, the
    step cache (one policy decides for the whole batch) and the server's LoRA set (one transformer weight set)."""
    context = None if req.image is None else im.context_size(*req.image.size, auto_resize=req.auto_resize)
    size = output_size(req, context)
    cfg = req.true_cfg if req.negative_prompt is not None and req.true_cfg > 1 else None
    return size, context, req.steps, cfg, req.cache, req.lora


def edit_batch(k: Kontext, reqs: list[EditRequest], prompts: list[Prompt | None] | None = None,
               contexts: list[Context | None] | None = None, to_images: bool = True) -> list[EditResult]:
    """Run requests sharing a batch_key through the loop at once, one result per request. Each request keeps its own
    seed (its noise drawn from its own generator, exactly as when it runs alone) and its own guidance. to_images=False
    leaves the decoded pixels for `with_images` to convert later, on another thread."""
    for req in reqs:
        check_request(req)
    contexts = [c if c is not None or r.image is None else encode_context(k, r.image, r.auto_resize)
                for r, c in zip(reqs, contexts or [None] * len(reqs))]
    prompts = [p or encode_prompts(k, r.prompts) for r, p in zip(reqs, prompts or [None] * len(reqs))]
    keys = {batch_key(r) for r in reqs}
    if len(keys) != 1:
        raise KontextError("requests of one batch must share output size, input image size, steps, true CFG, cache "
                           "and LoRA set")
    (width, height), _, steps, true_cfg, cache_spec, _ = keys.pop()
    sizes = [len(r.prompts) for r in reqs]
    prompt = concat_prompts(prompts)
    negative = None
    if true_cfg is not None:
        negative = concat_prompts([encode_prompts(k, [r.negative_prompt] * len(r.prompts)) for r in reqs])
    context = concat_contexts(contexts, sizes)
    noise = torch.cat([draw_noise(n, k.config.latent_channels, width, height, r.seed) for r, n in zip(reqs, sizes)])
    x = pack_latents(noise).to(k.device)
    ids = latent_ids(noise.shape[2], noise.shape[3], index=0).to(k.device)
    if context is not None:
        ids = torch.cat([ids, context.ids], dim=0)
    sigmas = flow_schedule(steps, x.shape[1], k.config.shift).to(k.device)
    guidance = torch.tensor([r.guidance if k.config.guidance_embeds else 0.0 for r, n in zip(reqs, sizes)
                             for _ in range(n)], dtype=torch.float32)
    cache = step_cache(k, cache_spec, steps)
    stop = stopper(reqs)
    x = denoise(k, x, ids, prompt, sigmas, guidance, context, negative, true_cfg or 1.0, cache, stop)
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


def concat_prompts(prompts: list[Prompt]) -> Prompt:
    """Several encoded prompt lists as one batch."""
    return Prompt(text=torch.cat([p.text for p in prompts]), pooled=torch.cat([p.pooled for p in prompts]))


def concat_contexts(contexts: list[Context | None], sizes: list[int]) -> Context | None:
    """Input images of one size as one batch: each request's tokens repeated for each of its prompts."""
    if contexts[0] is None:
        return None
    tokens = torch.cat([c.tokens.expand(n, -1, -1) for c, n in zip(contexts, sizes)])
    return Context(tokens, contexts[0].ids, contexts[0].width, contexts[0].height)


def metadata(k: Kontext, req: EditRequest, width: int, height: int, cache: dict | None = None) -> dict:
    """What produced an image: prompt, seed, steps, guidance, size, T5 text length, step cache, backend and
    checkpoint."""
    return {"prompts": req.prompts, "negative_prompt": req.negative_prompt, "true_cfg": req.true_cfg, "seed": req.seed,
            "steps": req.steps, "guidance": req.guidance, "width": width, "height": height,
            "auto_resize": req.auto_resize, "edited": req.image is not None, "text_length": k.config.text_length,
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
