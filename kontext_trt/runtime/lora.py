"""FLUX.1 Kontext LoRAs: read them (diffusers/PEFT, kohya, ai-toolkit, ... through diffusers' own converters) and fuse
them into any backend's transformer weights (stages.SetsWeights).

A LoRA adds to a linear weight W (out, in) the product of its two factors, up (out, r) @ down (r, in), scaled by
alpha / r (PEFT's `scaling`) and the user's scale. Several LoRAs add up. Each fused weight is computed in float32 from
the base weight and cast back once:

    W' = cast(W.float() + sum_i scale_i * alpha_i / r_i * up_i.float() @ down_i.float())

Swapping never subtracts: the backend keeps (or re-reads) the base weights, so LoRA A -> B -> none returns the base
bit for bit.
"""
from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.stages import SetsWeights

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the PEFT LoraConfig as JSON
LoraSpec = tuple[str | Path, float]


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear layer: up (out, r) @ down (r, in) times `scaling` (alpha / r), optional up bias (out,)."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scaling: float


@dataclass(frozen=True)
class Lora:
    """A LoRA file read into diffusers module names (transformer_blocks.0.attn.to_q), with the user's scale."""

    path: Path
    scale: float
    layers: dict[str, LoraLayer]

    def describe(self) -> dict:
        """What goes into PNG metadata and manifests."""
        return {"file": self.path.name, "scale": self.scale}


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or as a folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / DIFFUSERS_FILE).is_file():
            return path / DIFFUSERS_FILE
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise KontextError(f"{path}: holds {len(files)} .safetensors files and no {DIFFUSERS_FILE}; "
                               f"pass the LoRA file itself (--lora FILE[:SCALE])", "lora", "invalid_value")
        return files[0]
    if not path.is_file():
        raise KontextError(f"{path}: no such LoRA file or folder; pass a .safetensors LoRA (--lora FILE[:SCALE])",
                           "lora", "not_found")
    if path.suffix != ".safetensors":
        raise KontextError(f"{path}: not a .safetensors file; LoRAs are read from safetensors only (pickled .bin/.pt "
                           f"files can run code): convert it with safetensors.torch.save_file",
                           "lora", "unsupported_format")
    return path


def read_lora(path: str | Path, scale: float = 1.0) -> Lora:
    """Read a LoRA file (or a folder holding one) into diffusers module names, converting other key layouts with
    diffusers' FluxLoraLoaderMixin.lora_state_dict (what load_lora_weights does). Transformer LoRAs only."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(file, "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY) or "null")
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise KontextError(f"{file}: not a readable safetensors LoRA ({str(error).splitlines()[0]})",
                           "lora", "unsupported_format") from None
    sd, alphas = _to_diffusers(file, tensors)
    text = sorted(key for key in sd if key.startswith("text_encoder"))
    if text:
        raise KontextError(f"{file}: holds text-encoder LoRA weights ({text[0]}); only transformer LoRAs are "
                           f"supported: keep its transformer.* keys and drop the text_encoder* ones",
                           "lora", "unsupported_format")
    if any(key.startswith("transformer.") for key in sd):
        sd = {key.removeprefix("transformer."): t for key, t in sd.items() if key.startswith("transformer.")}
        alphas = {key.removeprefix("transformer."): float(a) for key, a in (alphas or {}).items()}
    config = {key.removeprefix("transformer."): value for key, value in (metadata or {}).items()}
    if config.get("use_dora"):
        raise KontextError(f"{file}: is a DoRA (use_dora); only plain LoRAs can be fused into engine weights",
                           "lora", "unsupported_format")
    return Lora(file, float(scale), _layers(file, sd, alphas or {}, config))


def _to_diffusers(file: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """diffusers' conversion of any known Flux LoRA layout to transformer.<module>.lora_A/lora_B keys and alphas."""
    from diffusers import FluxKontextPipeline

    if not tensors:
        raise KontextError(f"{file}: holds no tensors; pass a LoRA file", "lora", "invalid_value")
    try:
        return FluxKontextPipeline.lora_state_dict(tensors, return_alphas=True)
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError, TypeError) as error:
        detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise KontextError(f"{file}: unknown LoRA key layout ({detail}); supported: diffusers/PEFT, kohya, "
                           f"ai-toolkit and the other Flux layouts diffusers' load_lora_weights reads",
                           "lora", "unsupported_format") from None


def _layers(file: Path, sd: dict[str, torch.Tensor], alphas: dict[str, float], config: dict) -> dict[str, LoraLayer]:
    """Group lora_A/lora_B(/bias) per module and work out each module's scaling as diffusers/PEFT would."""
    layers: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in sd.items():
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
        if match is None:
            raise KontextError(f"{file}: unknown LoRA key layout ({key} is not a lora_A/lora_B weight); supported: "
                               f"diffusers/PEFT, kohya, ai-toolkit and the other Flux layouts diffusers reads",
                               "lora", "unsupported_format")
        layers[match[1]][match[2]] = tensor
    if not layers:
        raise KontextError(f"{file}: holds no transformer LoRA weights", "lora", "invalid_value")
    default_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    out = {}
    for module, parts in layers.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise KontextError(f"{file}: {module} has only one of lora_A/lora_B; the file is incomplete",
                               "lora", "invalid_value")
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise KontextError(f"{file}: {module} has factors {list(down.shape)} and {list(up.shape)}, not "
                               f"(r, in) and (out, r) of a linear LoRA", "lora", "invalid_value")
        rank = down.shape[0]
        alpha = _alpha(module, rank, alphas, default_alpha, config)
        divisor = rank ** 0.5 if config.get("use_rslora") else rank
        out[module] = LoraLayer(down, up, parts.get("lora_B.bias"), alpha / divisor)
    return out


def _alpha(module: str, rank: int, alphas: dict[str, float], default: float | None, config: dict) -> float:
    """A module's alpha: its alpha key, else the file's most common one (diffusers' rule), else the PEFT config's
    alpha_pattern/lora_alpha, else the rank (scaling 1)."""
    if alphas:
        return alphas.get(f"{module}.alpha", default)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(value)
    return float(config.get("lora_alpha", rank))


def read_loras(specs: Sequence[LoraSpec]) -> list[Lora]:
    """Each (path, scale) read."""
    return [read_lora(path, scale) for path, scale in specs]


def check_fit(loras: Sequence[Lora], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, in one line, a LoRA layer this transformer lacks or whose shape does not fit its weight."""
    for lora in loras:
        for module, layer in lora.layers.items():
            shape = shapes.get(f"{module}.weight")
            if shape is None:
                raise KontextError(f"{lora.path}: targets {module}, which this checkpoint's transformer does not have "
                                   f"(or cannot swap); is it a LoRA for FLUX.1 Kontext / FLUX.1 [dev]?",
                                   "lora", "model_mismatch")
            if (layer.up.shape[0], layer.down.shape[1]) != tuple(shape):
                raise KontextError(f"{lora.path}: {module} is ({layer.up.shape[0]}, {layer.down.shape[1]}) in the "
                                   f"LoRA but {tuple(shape)} in this checkpoint; it was made for another model size",
                                   "lora", "model_mismatch")
            if layer.bias is not None and f"{module}.bias" not in shapes:
                raise KontextError(f"{lora.path}: {module} has a LoRA bias but no bias in this checkpoint",
                                   "lora", "model_mismatch")


class FusedWeights:
    """(name, fused weight) for every weight the LoRAs touch (those in `only`, if given), computed one at a time from
    base(name) plus the scaled products, added in float32 on the base weight's device and cast to its dtype once.
    Iterating again computes them again from the base; `names` lists them before any is computed (a TensorRT refit
    plans its batches with it, and replays the set after an engine reload)."""

    def __init__(self, loras: Sequence[Lora], base: Callable[[str], torch.Tensor],
                 only: Collection[str] | None = None) -> None:
        self.base = base
        self.targets: dict[str, list[tuple[float, LoraLayer, str]]] = collections.defaultdict(list)
        for lora in loras:
            for module, layer in lora.layers.items():
                self.targets[f"{module}.weight"].append((lora.scale * layer.scaling, layer, "weight"))
                if layer.bias is not None:
                    self.targets[f"{module}.bias"].append((lora.scale * layer.scaling, layer, "bias"))
        if only is not None:
            self.targets = {name: parts for name, parts in self.targets.items() if name in only}

    @property
    def names(self) -> list[str]:
        """The weights this set changes, in the order they are computed."""
        return list(self.targets)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, parts in self.targets.items():
            weight = self.base(name)
            fused = weight.float()
            for factor, layer, kind in parts:
                if kind == "weight":
                    delta = layer.up.to(weight.device, torch.float32) @ layer.down.to(weight.device, torch.float32)
                else:
                    delta = layer.bias.to(weight.device, torch.float32)
                fused = fused + factor * delta
            yield name, fused.to(weight.dtype)


def fused_weights(loras: Sequence[Lora], base: Callable[[str], torch.Tensor],
                  only: Collection[str] | None = None) -> FusedWeights:
    """The fused weights of these LoRAs over `base` (see FusedWeights)."""
    return FusedWeights(loras, base, only)


def transformer_targets(stages: dict) -> tuple[list[SetsWeights], str | None]:
    """What a LoRA set on a pipeline must reach: the single transformer and every step-cache part present (a
    TensorRT engine through its refit), but not a part that runs another stage's modules (torch's parts run the
    transformer's: stages.SharesWeights). Returns (targets, why the parts are left out): beside a single transformer,
    parts that cannot swap weights (an export older than their weight maps) are left out with the reason, which
    step caching then gives; without one, any stage that cannot swap refuses in one line."""
    from kontext_trt.core.stages import TRANSFORMER_PARTS, RefitsWeights, SharesWeights

    targets, left_out = [], None
    for name in ("transformer", *TRANSFORMER_PARTS):
        stage = stages.get(name)
        if stage is None or isinstance(stage, SharesWeights) and stage.weights_of in stages:
            continue
        try:
            target = stage.weight_target() if isinstance(stage, RefitsWeights) else stage
            if not isinstance(target, SetsWeights):
                raise KontextError(f"this backend's {name} ({type(stage).__name__}) cannot swap weights; LoRAs run on "
                                   "the torch and onnxruntime backends and on engines built with `kontext-trt build "
                                   "--refit`", "lora", "unsupported_backend")
            target.weight_shapes()  # refuses, in one line, a stage without a weight map
        except KontextError as exc:
            if name == "transformer" or "transformer" not in stages:
                raise
            left_out = left_out or f"{name}: {exc}"
            continue
        targets.append(target)
    if not targets:
        raise KontextError("this pipeline has no transformer to apply LoRAs to", "lora", "unsupported_backend")
    return targets, left_out


def apply_loras(targets: object | Sequence[object], specs: Sequence[LoraSpec]) -> list[Lora]:
    """Set each target's weights (one stage, or the transformer and its parts) to its base plus these LoRAs (none:
    back to the base): every LoRA layer must fit one of them, and each gets the layers it holds, fused from its own
    base; returns the LoRAs read."""
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    for stage in targets:
        if not isinstance(stage, SetsWeights):
            raise KontextError(f"this backend's transformer ({type(stage).__name__}) cannot swap weights; LoRAs run "
                               f"on the torch and onnxruntime backends and on engines built with `kontext-trt build "
                               f"--refit`", "lora", "unsupported_backend")
    loras = read_loras(specs)
    shapes = [stage.weight_shapes() for stage in targets]
    check_fit(loras, {name: shape for own in shapes for name, shape in own.items()})
    for stage, own in zip(targets, shapes):
        stage.set_weights(fused_weights(loras, stage.base_weight, own))
    return loras


def fuse_into(model: torch.nn.Module, specs: Sequence[LoraSpec]) -> list[Lora]:
    """Fuse LoRAs into a model's parameters for good (export, quantize); returns the LoRAs read."""
    loras = read_loras(specs)
    params = dict(model.named_parameters())
    check_fit(loras, {name: tuple(p.shape) for name, p in params.items()})
    with torch.no_grad():
        for name, value in fused_weights(loras, lambda n: params[n].detach()):
            params[name].copy_(value)
    return loras
