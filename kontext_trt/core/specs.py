"""What a user typed, parsed once into typed values at the edge (CLI flags, API keywords, server fields) and passed
on: a step-cache spec (CacheSpec), a LoRA (LoraSpec), what to load (LoadSpec), what leaves the toolkit (SafetySpec).

Step-cache grammar (CLI --cache, the server's `cache` field, the API's cache=): off | fbcache[:T] | teacache[:T], then
optional ,warmup=N ,cooldown=N ,coefficients=c4/c3/c2/c1/c0 (highest power first), e.g. teacache:0.4,warmup=2.
The policies themselves are runtime/step_cache.py's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kontext_trt.core.errors import KontextError

# TeaCache4FLUX's rescale polynomial (ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py), highest power first.
TEACACHE_FLUX = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
DEFAULT_THRESHOLDS = {"fbcache": 0.12, "teacache": 0.4}  # ParaAttention's FLUX default; TeaCache's ~1.8x FLUX figure
POLICIES = ("off", *DEFAULT_THRESHOLDS)


@dataclass(frozen=True)
class CacheSpec:
    """A parsed --cache value."""

    policy: str = "off"
    threshold: float = 0.0
    warmup: int = 1
    cooldown: int = 1
    coefficients: tuple[float, ...] = TEACACHE_FLUX

    def __str__(self) -> str:
        if self.policy == "off":
            return "off"
        extra = [f"warmup={self.warmup}"] if self.warmup != 1 else []
        extra += [f"cooldown={self.cooldown}"] if self.cooldown != 1 else []
        if self.policy == "teacache" and self.coefficients != TEACACHE_FLUX:
            extra.append("coefficients=" + "/".join(f"{c:g}" for c in self.coefficients))
        return ",".join([f"{self.policy}:{self.threshold:g}", *extra])


def parse_cache(text: str) -> CacheSpec:
    """A CacheSpec from 'off', 'fbcache:0.12', 'teacache:0.4,warmup=2,cooldown=1,coefficients=a/b/c', or one line
    saying what is wrong."""
    hint = "write off, fbcache:T or teacache:T (e.g. fbcache:0.12), optionally ,warmup=N,cooldown=N"
    head, *options = [part.strip() for part in str(text).strip().lower().split(",")]
    policy, _, threshold = head.partition(":")
    if policy not in POLICIES:
        raise KontextError(f"--cache {text!r}: unknown policy {policy!r}: {hint}", "cache", "invalid_value")
    if policy == "off":
        if threshold or options:
            raise KontextError(f"--cache {text!r}: off takes no threshold or options", "cache", "invalid_value")
        return CacheSpec()
    fields: dict = {"policy": policy, "threshold": DEFAULT_THRESHOLDS[policy]}
    try:
        if threshold:
            fields["threshold"] = float(threshold)
        for option in options:
            key, _, value = option.partition("=")
            if key in ("warmup", "cooldown"):
                fields[key] = int(value)
            elif key == "coefficients" and policy == "teacache":
                fields[key] = tuple(float(c) for c in value.split("/"))
            else:
                raise KontextError(f"--cache {text!r}: unknown option {key!r}: {hint}", "cache", "invalid_value")
    except ValueError:
        raise KontextError(f"--cache {text!r}: not a number where one belongs: {hint}", "cache",
                           "invalid_value") from None
    spec = CacheSpec(**fields)
    if not (spec.threshold >= 0 and spec.warmup >= 1 and spec.cooldown >= 1 and spec.coefficients):
        raise KontextError(f"--cache {text!r}: the threshold must be >= 0 and warmup, cooldown >= 1 (the first and "
                           "last steps are always computed)", "cache", "out_of_range")
    return spec


LoraSpec = tuple[Path, float]  # a LoRA file (or folder holding one) and its scale


def parse_lora(text: str) -> LoraSpec:
    """A --lora value, PATH[:SCALE] (scale 1.0 when there is no numeric suffix) -> (path, scale)."""
    path, _, scale = text.rpartition(":")
    if path and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", scale):
        return Path(path), float(scale)
    return Path(text), 1.0


def parse_budget(text: str) -> int | str:
    """A --weight-streaming-budget value: 'auto', or bytes with an optional binary unit (8GiB, 512M, 1.5G)."""
    text = text.strip().lower()
    if text == "auto":
        return text
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)i?b?", text)
    if match is None:
        raise KontextError(f"{text!r} is not a size: write bytes like 8GiB, 512MiB, 1073741824 or auto",
                           param="weight_streaming_budget", code="invalid_value")
    return int(float(match[1]) * 1024 ** {"": 0, "k": 1, "m": 2, "g": 3}[match[2]])


@dataclass(frozen=True)
class LoadSpec:
    """What to load, whoever asks (edit, generate, serve, bench, the Python API): TensorRT engines when `engines` is
    given (the set picked by precision and sku), else ONNX Runtime over the export folder `onnx` (backend
    onnxruntime), else torch over the checkpoint `model` in `dtype` on `device`. The transformer's LoRAs are applied;
    `cache` is the step cache of requests that name none, and any cache other than off loads the transformer's three
    parts on engines (torch and ONNX Runtime always have both)."""

    model: Path | None = None
    backend: str = "torch"  # torch | onnxruntime | tensorrt (tensorrt needs engines)
    onnx: Path | None = None
    engines: Path | None = None
    dtype: str = "bf16"  # torch backend
    device: str = "cpu"
    precision: str | None = None  # engines: the set's precision (None: the only one built)
    sku: str = "auto"  # engines: the SKU whose set runs (auto: this GPU's)
    low_vram: bool = False
    weight_budget: int | str | None = None  # weight streaming: bytes, or "auto"
    cuda_graphs: bool = False
    loras: tuple[LoraSpec, ...] = ()
    cache: CacheSpec = field(default_factory=CacheSpec)

    def __post_init__(self) -> None:
        for name in ("model", "onnx", "engines"):  # keyword callers may pass str
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "loras", tuple((Path(path), float(scale)) for path, scale in self.loras))

    @property
    def split(self) -> bool:
        """Load the transformer's three parts (step caching) instead of the single transformer: engines only."""
        return self.cache.policy != "off"


@dataclass(frozen=True)
class SafetySpec:
    """What leaves the toolkit: the safety checker (nudenet, none or module:callable) and the C2PA credentials."""

    checker: str = "nudenet"
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
