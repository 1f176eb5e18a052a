"""The OpenAI Images API shapes: request fields -> EditRequest (checked against the server's Limits), results ->
response bodies (PNG, JPEG or WebP), errors -> error bodies that name no server path.

Extensions beyond OpenAI's fields live in OPTIONS (one parser per field, named like EditRequest's): later request
options (LoRA, caches) join that table.
"""
from __future__ import annotations

import base64
import io
import re
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from PIL import Image, UnidentifiedImageError

from kontext_trt.core import image as im
from kontext_trt.core.checks import SEED_MAX
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import CacheSpec, parse_cache, parse_lora
from kontext_trt.runtime import flow
from kontext_trt.runtime.flow import EditRequest, EditResult

MAX_N = 10  # OpenAI's own bound on n
# OpenAI fields a Kontext server accepts and has no use for (`model`: any name is served by the one model).
IGNORED = frozenset({"model", "user", "quality", "style", "background", "moderation"})
# Sane ranges of the float fields: FLUX's distilled guidance is trained around 1..10 (Kontext uses 2.5), true CFG
# above ~10 saturates; past 20 either only burns the image.
RANGES = {"guidance": (0.0, 20.0), "true_cfg": (1.0, 20.0)}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DECODED = ("PNG", "JPEG", "WEBP")  # the only formats Pillow may parse from an upload
MAX_LORA_CHARS, MAX_LORAS, MAX_LORA_SCALE = 512, 8, 10.0
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
# An absolute path in a message (/a/b...): answered as its last part; /v1/... routes stay.
ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])/(?!v1/)(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]*)")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (serve's --max-steps, --max-pixels, --max-upload-mib,
    --max-prompt-bytes)."""

    max_steps: int = 100
    max_pixels: int = 4096 * 4096
    max_upload_bytes: int = 32 * 2**20
    max_prompt_bytes: int = 4096
    max_n: int = MAX_N


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self, hidden: Iterable[str] = ()) -> dict:
        """The JSON body OpenAI clients parse; its message with no server path in it (hide_paths)."""
        return {"error": {"message": hide_paths(self.message, hidden), "type": self.type, "param": self.param,
                          "code": self.code}}


def hide_paths(message: str, hidden: Iterable[str] = ()) -> str:
    """A message with the server's own paths (`hidden`: the folders it was started with) and any absolute path
    replaced by their last part: a name, never where it lives."""
    for path in sorted(hidden, key=len, reverse=True):
        if path:
            message = message.replace(path, path.rstrip("/").rsplit("/", 1)[-1])
    return ABSOLUTE_PATH.sub(lambda m: m[1] or "<path>", message)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 invalid_request_error: `param` the request field at fault, `code` a stable machine word."""
    return ApiError(400, message, code=code, param=param)


def request_error(exc: KontextError) -> ApiError:
    """A KontextError as a 400 in the API's words (field_names), with its param and code."""
    return bad_request(field_names(exc.message), exc.param, exc.code)


def content_policy_violation(message: str) -> ApiError:
    """OpenAI's answer to a request or result its safety system rejects: 400 with code content_policy_violation."""
    return ApiError(400, message, code="content_policy_violation")


def shown(value: Any) -> str:
    """A sent value as an error message quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:56]}...{text[-1]}"


def integer(text: Any) -> int:
    """An integer field (form text or JSON number)."""
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError("not an integer")
    if not isinstance(text, (int, float, str)):
        raise TypeError("not an integer")
    return int(text)


def number(text: Any) -> float:
    """A float field (flow.check_request refuses nan and inf, check_ranges what is outside RANGES)."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ValueError("not a number")
    return float(text)


def boolean(text: Any) -> bool:
    """A true/false field."""
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("true", "1", "yes", "on"):
        return True
    if str(text).lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("not true or false")


def text(value: Any) -> str:
    """A text field."""
    if not isinstance(value, str):
        raise ValueError("not text")
    return value


def cache_spec(value: Any) -> CacheSpec:
    """A step-cache spec (core/specs.py); a bad one raises its KontextError (parse_request answers it as 400)."""
    return parse_cache(text(value))


def lora_names(value: Any) -> str:
    """A `lora` value, NAME[:SCALE],...: at most MAX_LORAS names of letters, digits and _.+- (no paths), finite
    scales within +-MAX_LORA_SCALE. The server resolves the names in its --lora-dir when the request runs."""
    value = text(value)
    if len(value) > MAX_LORA_CHARS:
        raise KontextError("too long", "lora", "string_above_max_length")
    items = [item.strip() for item in value.split(",") if item.strip()]
    if len(items) > MAX_LORAS:
        raise KontextError("too many names", "lora", "out_of_range")
    for item in items:
        name, scale = parse_lora(item)
        if not LORA_NAME.fullmatch(str(name)) or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise ValueError("not a LoRA name")
    return value


# Extension fields: name -> (parser, what a valid value looks like). Each becomes the EditRequest field of its name.
OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "seed": (integer, "an integer like 42"),
    "steps": (integer, "an integer like 28 (or none: the model's default, FLUX.1 28, klein 4 distilled or 50 base)"),
    "guidance": (number, "a number like 2.5 (FLUX.1's default; klein's CFG scale defaults to 4)"),
    "negative_prompt": (text, "text"),
    "true_cfg": (number, "a number like 4.0 (above 1 with negative_prompt)"),
    "auto_resize": (boolean, "true or false"),
    "cache": (cache_spec, "off, fbcache:T or teacache:T, e.g. fbcache:0.12"),
    "lora": (lora_names, f"at most {MAX_LORAS} LoRA names of the server's --lora-dir (letters, digits, _.+-) with "
                         f"optional scales within +-{MAX_LORA_SCALE:g}, like relight:0.8,style"),
}


@dataclass(frozen=True)
class Output:
    """How a response encodes its images: output_format and, for JPEG and WebP, output_compression as the
    encoder's quality (100: the least compression; the CLI writes 95)."""

    format: str = "png"
    quality: int = 95

    @property
    def pil_format(self) -> str:
        return OUTPUT_FORMATS[self.format]


def parse_output(fields: Mapping[str, Any]) -> Output:
    """output_format (png, jpeg, webp) and output_compression (0..100), or ApiError(400)."""
    fmt = fields.get("output_format") or "png"
    if not isinstance(fmt, str) or fmt not in OUTPUT_FORMATS:
        raise bad_request(f"output_format {shown(fmt)} is not offered: send png, jpeg or webp", "output_format",
                          "unsupported_format")
    quality = fields.get("output_compression")
    if quality in (None, ""):
        return Output(fmt)
    try:
        quality, code = integer(quality), "out_of_range"
    except (TypeError, ValueError):
        quality, code = -1, "invalid_value"
    if not 0 <= quality <= 100:
        raise bad_request(f"output_compression {shown(fields.get('output_compression'))} must be an integer from 0 "
                          "to 100", "output_compression", code)
    return Output(fmt, quality)


def parse_size(value: Any) -> tuple[int, int] | None:
    """'WxH' -> (W, H); None or 'auto' -> None (Kontext's bucket of the input, or 1024x1024 from text)."""
    if value in (None, "", "auto"):
        return None
    try:
        return im.parse_size(value if isinstance(value, str) else shown(value))
    except KontextError as exc:
        raise bad_request(f"{exc.message} (or auto)", "size", exc.code) from None


def check_text_size(name: str, value: str, max_bytes: int) -> None:
    """Refuse text over max_bytes of UTF-8 before anything reads it further (400 string_above_max_length)."""
    size = len(value) if len(value) > max_bytes else len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise bad_request(f"{name} is {'over ' if len(value) > max_bytes else ''}{size} bytes: this server takes at "
                          f"most {max_bytes} bytes of UTF-8 (the text encoders read the model's T5 length, 512 "
                          "tokens at most)", name, "string_above_max_length")


def parse_request(fields: Mapping[str, Any], images: Image.Image | list[Image.Image] | None,
                  limits: Limits | None = None, defaults: Mapping[str, Any] | None = None) -> EditRequest:
    """An EditRequest (n prompts) on the reference images (one, a list in order, or none) from OpenAI fields plus
    extensions (`defaults`, the server's, for extensions not sent), or ApiError(400) naming the field at fault
    (param) with a code (missing_argument, invalid_value, out_of_range, unknown_parameter, string_above_max_length,
    ...)."""
    limits = limits or Limits()
    unknown = set(fields) - {"prompt", "n", "size", "response_format", "output_format", "output_compression",
                             *OPTIONS, *IGNORED}
    if unknown:
        name = sorted(unknown)[0]
        raise bad_request(f"unrecognized field {shown(name)}: this server takes prompt, n, size, response_format, "
                          f"output_format, output_compression and {', '.join(OPTIONS)}", name, "unknown_parameter")
    prompt = fields.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise bad_request("prompt is missing: send the instruction, e.g. prompt=make the sky pink", "prompt",
                          "missing_argument")
    if not isinstance(prompt, str):
        raise bad_request(f"prompt must be text, got {type(prompt).__name__}", "prompt", "invalid_type")
    check_text_size("prompt", prompt, limits.max_prompt_bytes)
    if fields.get("response_format") not in (None, "", "b64_json"):
        raise bad_request("response_format url is not offered (images are not stored): use b64_json",
                          "response_format", "unsupported_value")
    parse_output(fields)
    try:
        n, code = integer(fields.get("n", 1)), "out_of_range"
    except (TypeError, ValueError):
        n, code = 0, "invalid_value"
    if not 1 <= n <= limits.max_n:
        raise bad_request(f"n {shown(fields.get('n'))} must be an integer from 1 to {limits.max_n}", "n", code)
    options = dict(defaults or {})
    for name, (parse, looks_like) in OPTIONS.items():
        if name in fields and fields[name] not in (None, ""):
            try:
                options[name] = parse(fields[name])
            except (TypeError, ValueError, KontextError) as exc:
                raise bad_request(f"{name} {shown(fields[name])} is invalid: send {looks_like}", name,
                                  getattr(exc, "code", "invalid_value")) from None
    if options.get("negative_prompt") is not None:
        check_text_size("negative_prompt", options["negative_prompt"], limits.max_prompt_bytes)
    size = parse_size(fields.get("size"))
    images = [images] if isinstance(images, Image.Image) else list(images or [])
    req = flow.request([prompt] * n, images, width=size and size[0], height=size and size[1], **options)
    try:
        flow.check_request(req)
    except KontextError as exc:
        raise request_error(exc) from None
    check_ranges(req, limits)
    return req


def check_ranges(req: EditRequest, limits: Limits) -> None:
    """Refuse what is finite but not sane: steps over limits.max_steps, guidance and true_cfg outside RANGES (steps
    not sent: the model's default, capped at max_steps by EditService.with_defaults)."""
    if req.steps is not None and req.steps > limits.max_steps:
        raise bad_request(f"steps {req.steps} is over this server's limit: send 1 to {limits.max_steps}", "steps",
                          "out_of_range")
    for name, (low, high) in RANGES.items():
        value = getattr(req, name)
        if value is not None and not low <= value <= high:
            raise bad_request(f"{name} {value:g} is out of range: send a number from {low:g} to {high:g}", name,
                              "out_of_range")


def per_image(req: EditRequest) -> list[EditRequest]:
    """A request of n images as n one-image requests, image i with seed + i (mod 2**64): each runs, batches and
    records its seed as that request alone would (the CLI's `--seed S+i`)."""
    return [replace(req, prompts=[prompt], seed=(req.seed + i) % (SEED_MAX + 1))
            for i, prompt in enumerate(req.prompts)]


def field_names(message: str) -> str:
    """A CLI error line in the API's words: --true-cfg -> true_cfg, --no-auto-resize -> auto_resize=false."""
    message = message.replace("--no-auto-resize", "auto_resize=false")
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), message)


def read_image(data: bytes, max_pixels: int = Limits.max_pixels) -> Image.Image:
    """An uploaded PNG, JPEG or WebP as RGB, its size checked from the header before any pixel is decoded; any other
    format (TIFF, EPS, GIF, ...) is never parsed. ApiError(400) naming `image` otherwise."""
    if not data:
        raise bad_request("image is empty: upload a PNG, JPEG or WebP file", "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels decides
            img = Image.open(io.BytesIO(data), formats=DECODED)
    except Image.DecompressionBombError:
        raise too_many_pixels("far more", max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise bad_request("image is not a readable PNG, JPEG or WebP file (other formats, such as TIFF, GIF, BMP or "
                          "EPS, are not accepted): convert it to PNG", "image", "unsupported_format") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise too_many_pixels(f"{width}x{height} = {width * height:,}", max_pixels)
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise bad_request(f"image is a damaged {img.format} file: upload it again or re-save it", "image",
                              "invalid_value") from None


def too_many_pixels(pixels: str, max_pixels: int) -> ApiError:
    """The 400 for an image whose header announces over max_pixels pixels."""
    return bad_request(f"image has {pixels} pixels: this server decodes at most {max_pixels:,}; downscale it (Kontext "
                       "edits at about one megapixel)", "image", "out_of_range")


def response_body(results: list[EditResult], signers: list[Callable[[bytes, str], bytes] | None] | None = None,
                  output: Output = Output()) -> dict:
    """{"created", "data": [{"b64_json"}], "output_format"}: one file per image in `output`'s format, each with the
    CLI's metadata (PNG text chunks; EXIF for JPEG and WebP) and, where its result's signer is given, a C2PA
    manifest."""
    files = []
    for result, sign in zip(results, signers or [None] * len(results)):
        for img, meta in zip(result.images, flow.image_metadata(result)):
            data = im.encode_image(img, meta, output.pil_format, output.quality)
            files.append(data if sign is None else sign(data, f"image-{len(files)}.{output.format}"))
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(data).decode()} for data in files],
            "output_format": output.format}
