"""Reading a shapes scene back from pixels, and scoring an edit's output against its target.

Each pixel takes the nearest palette colour (or background) when it lies within MATCH of it; pixels of one colour
that touch form a blob; a blob of at least MIN_AREA pixels is a shape, whose kind follows from how much of its box
it fills (square ~1, circle ~pi/4, triangle ~1/2).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kontext_trt.shapes.scenes import BACKGROUND, COLOURS, Edit, render

MATCH = 70.0  # largest RGB distance at which a pixel counts as a palette colour
MIN_AREA = 120  # the smallest shape (a 20 px triangle) fills 200 pixels
CENTRE_TOLERANCE = 6.0  # pixels a kept shape's centre may move
MARGIN = 3  # pixels around a touched shape's box that are not "untouched"
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
NAMES = ["background", *COLOURS]


@dataclass(frozen=True)
class Found:
    """A shape read from pixels: kind, colour, box (x0, y0, x1, y1 exclusive) and pixel count."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    area: int

    def centre(self) -> tuple[float, float]:
        """The box centre in pixels."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def labels(image: Image.Image) -> np.ndarray:
    """(H, W) int: -1 unmatched, 0 background, 1.. the palette colours in COLOURS order."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)
    nearest = dist.argmin(-1)
    return np.where(dist.min(-1) <= MATCH, nearest, -1)


def blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


def kind_of(area: int, width: int, height: int) -> str:
    """The shape kind whose fill of its box is nearest this blob's."""
    fill = area / (width * height)
    return min((("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)), key=lambda k: abs(k[1] - fill))[0]


def read_shapes(image: Image.Image) -> list[Found]:
    """The shapes in an image, largest first."""
    grid = labels(image)
    found = []
    for index, colour in enumerate(COLOURS, start=1):
        for pixels in blobs(grid == index):
            if len(pixels) < MIN_AREA:
                continue
            ys, xs = zip(*pixels)
            box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
            found.append(Found(kind_of(len(pixels), box[2] - box[0], box[3] - box[1]), colour, box, len(pixels)))
    return sorted(found, key=lambda f: -f.area)


def correct(edit: Edit, found: list[Found]) -> bool:
    """Whether the shapes read from an output are the target's: the same kinds and colours, one each, and every shape
    of the input that the target keeps (recoloured or not) within CENTRE_TOLERANCE of where it was."""
    if sorted((f.kind, f.colour) for f in found) != sorted((s.kind, s.colour) for s in edit.target):
        return False
    kept = [s for s in edit.target if edit.source is not None and any(s.box() == o.box() for o in edit.source)]
    by_kind = {f.kind: f for f in found}
    return all(math.dist(by_kind[s.kind].centre(), s.centre()) <= CENTRE_TOLERANCE for s in kept)


def untouched_mask(edit: Edit, found: list[Found]) -> np.ndarray:
    """(H, W) bool: pixels away from the shapes the edit changes and from any shape the output holds that the input
    does not (where an added shape went)."""
    mask = np.ones((128, 128), dtype=bool)
    source = edit.source or ()
    boxes = [s.box() for s in edit.touched]
    boxes += [f.box for f in found if not any((f.kind, f.colour) == (s.kind, s.colour) for s in source)]
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0 - MARGIN):y1 + MARGIN, max(0, x0 - MARGIN):x1 + MARGIN] = False
    return mask


def psnr(a: Image.Image, b: Image.Image, mask: np.ndarray) -> float:
    """PSNR in dB of two images over the masked pixels (capped at 99 for identical ones)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)[mask]
    y = np.asarray(b.convert("RGB"), dtype=np.float64)[mask]
    mse = float(((x - y) ** 2).mean()) if x.size else 0.0
    return 99.0 if mse == 0 else min(99.0, 10 * math.log10(255.0**2 / mse))


def score(edit: Edit, output: Image.Image) -> dict:
    """{"kind", "correct", "psnr" (untouched region against the input; None without an input), "found"}."""
    found = read_shapes(output)
    value = None
    if edit.source is not None:
        value = psnr(render(edit.source), output, untouched_mask(edit, found))
    return {"kind": edit.kind, "correct": correct(edit, found), "psnr": value,
            "found": [f"{f.colour} {f.kind}" for f in found]}

