"""The OpenAI Images API shapes: request fields -> EditRequest, results -> response bodies, errors -> error bodies.

Extensions beyond OpenAI's fields live in OPTIONS (one parser per field, named like EditRequest's): later request
options (LoRA, caches) join that table.
"""
from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Callable, Mapping

from PIL import Image, UnidentifiedImageError

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import CacheSpec, parse_cache
from kontext_trt.runtime import flow
from kontext_trt.runtime.flow import EditRequest, EditResult

MAX_N = 10  # OpenAI's own bound on n
# OpenAI fields a Kontext server accepts and has no use for.
IGNORED = frozenset({"model", "user", "quality", "style", "background", "moderation", "output_compression"})


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 invalid_request_error: `param` the request field at fault, `code` a stable machine word."""
    return ApiError(400, message, code=code, param=param)


def request_error(exc: KontextError) -> ApiError:
    """A KontextError as a 400 in the API's words (field_names), with its param and code."""
    return bad_request(field_names(exc.message), exc.param, exc.code)


def content_policy_violation(message: str) -> ApiError:
    """OpenAI's answer to a request or result its safety system rejects: 400 with code content_policy_violation."""
    return ApiError(400, message, code="content_policy_violation")


def integer(text: Any) -> int:
    """An integer field (form text or JSON number)."""
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError("not an integer")
    return int(text)


def number(text: Any) -> float:
    """A float field (flow.check_request refuses nan and inf)."""
    if isinstance(text, bool):
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


# Extension fields: name -> (parser, what a valid value looks like). Each becomes the EditRequest field of its name.
OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "seed": (integer, "an integer like 42"),
    "steps": (integer, "an integer like 28"),
    "guidance": (number, "a number like 2.5"),
    "negative_prompt": (text, "text"),
    "true_cfg": (number, "a number like 4.0 (above 1 with negative_prompt)"),
    "auto_resize": (boolean, "true or false"),
    "cache": (cache_spec, "off, fbcache:T or teacache:T, e.g. fbcache:0.12"),
    "lora": (text, "LoRA names of the server's --lora-dir with optional scales, like relight:0.8,style"),
}


def parse_size(value: Any) -> tuple[int, int] | None:
    """'WxH' -> (W, H); None or 'auto' -> None (Kontext's bucket of the input, or 1024x1024 from text)."""
    if value is None or value == "auto":
        return None
    try:
        return im.parse_size(value)
    except KontextError as exc:
        raise bad_request(f"{exc.message} (or auto)", "size", exc.code) from None


def parse_request(fields: Mapping[str, Any], image: Image.Image | None, max_n: int = MAX_N,
                  defaults: Mapping[str, Any] | None = None) -> EditRequest:
    """An EditRequest from OpenAI fields plus extensions (`defaults`, the server's, for extensions not sent), or
    ApiError(400) naming the field at fault (param) with a code (missing_argument, invalid_value, out_of_range,
    unknown_parameter, ...)."""
    unknown = set(fields) - {"prompt", "n", "size", "response_format", "output_format", *OPTIONS, *IGNORED}
    if unknown:
        raise bad_request(f"unrecognized field {sorted(unknown)[0]!r}: this server takes prompt, n, size, "
                          f"response_format and {', '.join(OPTIONS)}", sorted(unknown)[0], "unknown_parameter")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt is missing: send the instruction, e.g. prompt=make the sky pink", "prompt",
                          "missing_argument")
    if fields.get("response_format", "b64_json") != "b64_json":
        raise bad_request("response_format url is not offered (images are not stored): use b64_json",
                          "response_format", "unsupported_value")
    if fields.get("output_format", "png") != "png":
        raise bad_request("output_format: this server returns png only", "output_format", "unsupported_format")
    try:
        n, code = integer(fields.get("n", 1)), "out_of_range"
    except (TypeError, ValueError):
        n, code = 0, "invalid_value"
    if not 1 <= n <= max_n:
        raise bad_request(f"n {fields.get('n')!r} must be an integer from 1 to {max_n}", "n", code)
    options = dict(defaults or {})
    for name, (parse, looks_like) in OPTIONS.items():
        if name in fields and fields[name] not in (None, ""):
            try:
                options[name] = parse(fields[name])
            except (TypeError, ValueError, KontextError) as exc:
                raise bad_request(f"{name} {fields[name]!r} is invalid: send {looks_like}", name,
                                  getattr(exc, "code", "invalid_value")) from None
    size = parse_size(fields.get("size"))
    req = EditRequest(prompts=[prompt] * n, image=image, width=size and size[0], height=size and size[1], **options)
    try:
        flow.check_request(req)
    except KontextError as exc:
        raise request_error(exc) from None
    return req


def field_names(message: str) -> str:
    """A CLI error line in the API's words: --true-cfg -> true_cfg, --no-auto-resize -> auto_resize=false."""
    message = message.replace("--no-auto-resize", "auto_resize=false")
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), message)


def read_image(data: bytes) -> Image.Image:
    """An uploaded image as RGB, or ApiError(400)."""
    if not data:
        raise bad_request("image is empty: upload a PNG, JPEG or WebP file", "image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise bad_request("image is not a readable PNG, JPEG or WebP file", "image", "unsupported_format") from None


def response_body(result: EditResult, sign: Callable[[bytes, str], bytes] | None = None) -> dict:
    """{"created", "data": [{"b64_json"}]}: one PNG per image, each with the CLI's metadata chunks (and a C2PA
    manifest when `sign` is given)."""
    pngs = [im.png_bytes(img, meta) for img, meta in zip(result.images, flow.image_metadata(result))]
    if sign is not None:
        pngs = [sign(png, f"image-{i}.png") for i, png in enumerate(pngs)]
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()} for png in pngs]}
