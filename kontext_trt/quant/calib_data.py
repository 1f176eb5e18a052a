"""Calibration and report inputs: (image, instruction) pairs from the shipped set, a folder, or a JSONL file.

- Shipped set: procedurally drawn scenes (runtime.image.sample_image, one seed and size each) with the instructions of
  calib_prompts.txt taken round-robin over their categories (local, style, text, background, character), so even a
  few pairs cover every kind of edit. They are drawn at Kontext bucket sizes of several aspect ratios, so calibration
  sees deployment token counts; with auto-resize off (quick CPU runs) at small sizes instead.
- Folder: every IMAGE.png/.jpg/.jpeg/.webp with its instruction in IMAGE.txt beside it.
- JSONL: one {"image": path (relative to the file's folder), "prompt": "..."} per line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

from kontext_trt.core.errors import KontextError
from kontext_trt.core.image import load_image, sample_image

DRAWN_SIZES = ((1024, 1024), (1184, 880), (880, 1184), (1248, 832), (832, 1248))  # Kontext buckets
SMALL_SIZES = ((128, 96), (96, 128), (112, 112), (144, 80), (80, 144))  # auto-resize off: quick CPU runs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPORT_SEED = 1000  # the report's drawn pairs start here: never among the pairs a calibration uses


@dataclass(frozen=True)
class Pair:
    """One calibration or report input: an RGB image, an editing instruction and where they came from."""

    image: Image.Image
    prompt: str
    source: str


def default_prompts() -> list[str]:
    """The shipped instructions, round-robin over their categories."""
    text = resources.files("kontext_trt.quant").joinpath("calib_prompts.txt").read_text(encoding="utf-8")
    by_category: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            category, prompt = line.split("\t", 1)
            by_category.setdefault(category, []).append(prompt.strip())
    columns = list(by_category.values())
    return [column[row] for row in range(max(map(len, columns))) for column in columns if row < len(column)]


def drawn_pairs(count: int, first: int = 0, small: bool = False) -> list[Pair]:
    """Pairs first .. first+count-1 of the shipped set: drawn scene seed i, size i and prompt i (cycling)."""
    prompts, sizes = default_prompts(), SMALL_SIZES if small else DRAWN_SIZES
    pairs = []
    for i in range(first, first + count):
        width, height = sizes[i % len(sizes)]
        pairs.append(Pair(sample_image(width, height, seed=i), prompts[i % len(prompts)],
                          f"drawn seed {i} {width}x{height}"))
    return pairs


def read_entries(path: Path) -> list[tuple[Path, str]]:
    """(image file, instruction) of every pair in a calibration folder or JSONL file, all checked without decoding
    the images: a missing image or instruction is a one-line error."""
    path = Path(path)
    if path.is_dir():
        return [_folder_entry(image) for image in sorted(path.iterdir()) if image.suffix.lower() in IMAGE_SUFFIXES]
    if path.is_file():
        return [_jsonl_entry(path, number, line) for number, line in
                enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    raise KontextError(f"calibration data {path} does not exist: pass a folder of IMAGE.png + IMAGE.txt pairs or a "
                       "JSONL file of {\"image\": ..., \"prompt\": ...} lines")


def calibration_pairs(calib: Path | None, size: int, small: bool = False) -> list[Pair]:
    """The first `size` pairs of --calib (every entry checked, only these decoded), or of the shipped set."""
    if calib is None:
        return drawn_pairs(size, small=small)
    entries = read_entries(calib)
    if not entries:
        raise KontextError(f"no calibration data found in {calib}: put IMAGE.png + IMAGE.txt pairs in the folder, or "
                           "{\"image\": ..., \"prompt\": ...} lines in the JSONL file")
    return [Pair(load_image(image), prompt, str(image)) for image, prompt in entries[:size]]


def _folder_entry(image: Path) -> tuple[Path, str]:
    """IMAGE.ext and the instruction in IMAGE.txt."""
    text = image.with_suffix(".txt")
    if not text.is_file():
        raise KontextError(f"calibration image {image} has no instruction: write it into {text}")
    prompt = text.read_text(encoding="utf-8").strip()
    if not prompt:
        raise KontextError(f"calibration instruction {text} is empty: write the edit instruction into it")
    return image, prompt


def _jsonl_entry(path: Path, number: int, line: str) -> tuple[Path, str]:
    """One JSONL line: {"image": path relative to the file, "prompt": text}."""
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise KontextError(f"{where}: not valid JSON ({error.msg}): write {{\"image\": ..., \"prompt\": ...}}") \
            from None
    if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("prompt"), str):
        raise KontextError(f"{where}: each line needs a string \"image\" and a string \"prompt\"")
    image = path.parent / item["image"]
    if not image.is_file():
        raise KontextError(f"{where}: calibration image {image} does not exist")
    if not item["prompt"].strip():
        raise KontextError(f"{where}: the prompt is empty")
    return image, item["prompt"].strip()
