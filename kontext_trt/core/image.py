"""Input images: Kontext resolution buckets, resizing, [-1, 1] tensors, and PNG/JPEG/WebP output with metadata."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from kontext_trt.core.checks import IMAGE_SUFFIXES, check_output_file
from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import remove_stale_temps, write_atomic

# (width, height) pairs Kontext was trained on.
KONTEXT_BUCKETS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
MULTIPLE = 16  # VAE 8x times the 2x2 packing
MIN_SIDE, MAX_SIDE = 64, 2048
EXIF_IMAGE_DESCRIPTION = 0x010E


def pick_bucket(width: int, height: int) -> tuple[int, int]:
    """The Kontext bucket whose aspect ratio is closest to width/height (ties: the smaller bucket)."""
    aspect = width / height
    _, w, h = min((abs(aspect - bw / bh), bw, bh) for bw, bh in KONTEXT_BUCKETS)
    return w, h


def context_size(width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
    """The size an input image is resized to: its bucket (auto-resize) or its own size, floored to 16."""
    if auto_resize:
        width, height = pick_bucket(width, height)
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768), checked as check_size does: the one parser of WxH sizes (edit, build, bench,
    the server's `size`)."""
    try:
        width, height = (int(side) for side in str(text).lower().split("x"))
    except ValueError:
        raise KontextError(f"size {text!r} is not WIDTHxHEIGHT: write it like 1024x1024", "size",
                           "invalid_value") from None
    check_size(width, height)
    return width, height


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'WxH,WxH,...' -> sizes in the order given, duplicates dropped."""
    return list(dict.fromkeys(parse_size(item) for item in text.split(",") if item.strip()))


def check_size(width: int, height: int) -> None:
    """Refuse an output size that is not a multiple of 16 or lies outside [64, 2048] (param: width or height)."""
    for name, side in (("width", width), ("height", height)):
        if side % MULTIPLE:
            raise KontextError(f"{name} {side} is not a multiple of 16: use {side // MULTIPLE * MULTIPLE} or "
                               f"{(side // MULTIPLE + 1) * MULTIPLE}", name, "invalid_value")
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise KontextError(f"{name} {side} is out of range: use a value from {MIN_SIDE} to {MAX_SIDE}", name,
                               "out_of_range")


def check_context_size(width: int, height: int, auto_resize: bool = True) -> None:
    """Refuse an input image whose resized size the model cannot take, naming the image's own size."""
    w, h = context_size(width, height, auto_resize)
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        size = "small" if min(w, h) < MIN_SIDE else "large"
        raise KontextError(f"the input image is {width}x{height}: too {size} to edit at its own size (--no-auto-resize"
                           f" needs {MIN_SIDE} to {MAX_SIDE} pixels a side): resize it or drop --no-auto-resize",
                           "image", "out_of_range")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or fail with one line naming the file (param image; code not_found, out_of_range
    for a decompression bomb, unsupported_format)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise KontextError(f"image {path} does not exist: pass an existing PNG/JPEG/WebP file", "image",
                           "not_found") from None
    except Image.DecompressionBombError as exc:
        raise KontextError(f"image {path} is refused as a decompression bomb ({exc}): pass an image of at most "
                           f"{Image.MAX_IMAGE_PIXELS} pixels", "image", "out_of_range") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise KontextError(f"image {path} is unreadable ({exc.__class__.__name__}): pass a valid PNG/JPEG/WebP file",
                           "image", "unsupported_format") from None


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize with LANCZOS to (width, height) and map to a (1, 3, H, W) float32 tensor in [-1, 1]."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """Map (B, 3, H, W) in [-1, 1] to uint8 PIL images: (x/2 + 1/2) clamped, times 255, rounded."""
    pixels = (images.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in (pixels * 255).round().astype(np.uint8)]


def a1111_quote(value: object) -> str:
    """A value as AUTOMATIC1111 writes it in infotext: as is, or JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(metadata: dict) -> str:
    """The `parameters` text in AUTOMATIC1111's layout (Forge's keys for Flux's distilled guidance): the prompt,
    `Negative prompt: ...` when there is one, then one line of `Key: value` pairs; keys with no value are left out."""
    source, width, height = metadata.get("source"), metadata.get("width"), metadata.get("height")
    pairs = {"Steps": metadata.get("steps"), "Sampler": "Euler", "Schedule type": "Simple",
             "CFG scale": metadata.get("true_cfg"), "Distilled CFG Scale": metadata.get("guidance"),
             "Seed": metadata.get("seed"), "Size": f"{width}x{height}" if width and height else None,
             "Model hash": metadata.get("checkpoint"), "Model": Path(source).name if source else None}
    lines = [metadata.get("prompt", "")]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    lines.append(", ".join(f"{key}: {a1111_quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def png_info(metadata: dict) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of a generated image: `kontext-trt` (JSON) and `parameters` (AUTOMATIC1111's layout)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("kontext-trt", json.dumps(metadata, sort_keys=True))
    info.add_text("parameters", a1111_parameters(metadata))
    return info


def png_bytes(image: Image.Image, metadata: dict) -> bytes:
    """A PNG in memory with the same text chunks save_image writes."""
    return encode_image(image, metadata, "PNG")


def save_options(fmt: str, metadata: dict, quality: int = 95) -> dict:
    """Pillow's save options carrying the generation parameters: PNG text chunks (png_info); JPEG and WebP: the JSON
    as EXIF ImageDescription (and, for JPEG, a COM comment) at `quality`."""
    if fmt == "PNG":
        return {"pnginfo": png_info(metadata)}
    text = json.dumps(metadata, sort_keys=True)
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = text
    options: dict = {"exif": exif, "quality": quality}
    if fmt == "JPEG":
        options["comment"] = text
    return options


def encode_image(image: Image.Image, metadata: dict, fmt: str = "PNG", quality: int = 95) -> bytes:
    """An image file in memory (PNG, JPEG or WebP) with the metadata save_image writes; `quality` (0..100) for JPEG
    and WebP."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options(fmt, metadata, quality))
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | Path, metadata: dict,
               finish: Callable[[bytes, Path], bytes] | None = None) -> Path:
    """Write an image atomically in the format its suffix names (PNG, JPEG, WebP) with the generation parameters:
    PNG text chunks (png_info); JPEG and WebP: the JSON as EXIF ImageDescription (and, for JPEG, a COM comment).
    `finish` may rewrite the encoded file before it is written (C2PA signing)."""
    path = check_output_file(path)
    remove_stale_temps(path.parent, path.name)
    fmt = IMAGE_SUFFIXES[path.suffix.lower()]
    if finish is None:
        return write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **save_options(fmt, metadata)))
    return write_atomic(path, finish(encode_image(image, metadata, fmt), path))


def sample_image(width: int = 896, height: int = 640, seed: int = 0) -> Image.Image:
    """A procedurally drawn scene (sky, sun, hills, a house) to edit when the user brings no image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([110 + 80 * y / height, 160 + 60 * y / height, 235 - 30 * y / height], -1)
    img = sky.copy()
    sun = (x - 0.75 * width) ** 2 + (y - 0.22 * height) ** 2 < (0.08 * height) ** 2
    img[sun] = (250, 215, 90)
    ridge = 0.62 * height + 0.06 * height * np.sin(x / width * 7 + rng.uniform(0, 6))
    img[y > ridge] = np.stack([60 + 40 * np.sin(x / 37), 140 + 20 * np.cos(y / 23), 70 + 0 * x], -1)[y > ridge]
    x0, x1, y0, y1 = int(0.2 * width), int(0.42 * width), int(0.5 * height), int(0.8 * height)
    img[y0:y1, x0:x1] = (200, 60, 50)
    roof = (y < y0) & (y > y0 - 0.5 * (x1 - x0) + np.abs(x - (x0 + x1) / 2)) & (x > x0) & (x < x1)
    img[roof] = (90, 50, 40)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))
