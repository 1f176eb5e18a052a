"""The shapes task: scenes follow the rules, and reading shapes back scores true edits right and wrong ones wrong."""
import random

import numpy as np
import pytest
from PIL import Image

from kontext_trt.shapes.read import read_shapes, score
from kontext_trt.shapes.scenes import (
    BACKGROUND,
    COLOURS,
    EDITS,
    KINDS,
    MAX_SPAN,
    MIN_SPAN,
    SIZE,
    all_prompts,
    fits,
    make_edit,
    render,
)


def edits(n: int, seed: int = 1):
    rng = random.Random(seed)
    return [make_edit(rng, EDITS[i % 4]) for i in range(n)]


def test_scenes_follow_the_rules():
    for edit in edits(400):
        for shapes in [edit.target] + ([edit.source] if edit.source is not None else []):
            assert 1 <= len(shapes) <= 3 or (edit.kind == "remove" and len(shapes) == 0)
            assert len({s.kind for s in shapes}) == len(shapes)  # never two of a kind
            for i, s in enumerate(shapes):
                assert MIN_SPAN <= s.span <= MAX_SPAN and s.colour in COLOURS and s.kind in KINDS
                assert 0 <= s.x and s.x + s.span <= SIZE and 0 <= s.y and s.y + s.span <= SIZE
                assert fits(s.box(), shapes[:i] + shapes[i + 1:])
        assert edit.prompt in all_prompts()
    assert len(all_prompts()) == len(set(all_prompts())) == 57
    assert render(()).getpixel((5, 5)) == BACKGROUND


@pytest.mark.parametrize("kind", EDITS)
def test_the_target_scores_correct_and_the_input_does_not(kind):
    rng = random.Random(7)
    for _ in range(25):
        edit = make_edit(rng, kind)
        good = score(edit, render(edit.target))
        assert good["correct"] and good["kind"] == kind
        if edit.source is not None:
            assert good["psnr"] == 99.0  # the target leaves the untouched region exactly as it was
            assert not score(edit, render(edit.source))["correct"]


def test_read_shapes_names_kind_and_colour_and_ignores_specks():
    edit = edits(3)[1]
    found = read_shapes(render(edit.target))
    assert sorted((f.kind, f.colour) for f in found) == sorted((s.kind, s.colour) for s in edit.target)
    pixels = np.asarray(render(edit.target)).copy()
    y, x = next((y, x) for y in range(0, 120, 8) for x in range(0, 120, 8)
                if (pixels[y:y + 6, x:x + 6] == BACKGROUND).all())
    pixels[y:y + 6, x:x + 6] = COLOURS["red"]  # 36 px: below MIN_AREA, a speck and not a shape
    assert read_shapes(Image.fromarray(pixels)) == found


def test_a_moved_shape_or_noisy_background_loses_points():
    rng = random.Random(3)
    edit = next(e for e in (make_edit(rng, "recolour") for _ in range(50)) if len(e.target) >= 2)
    kept = next(s for s in edit.target if s in edit.source)
    moved = tuple(s if s != kept else s.__class__(s.kind, s.colour, max(2, s.x - 12), s.y, s.span) for s in edit.target)
    if all(a == b or not _overlaps(a, b) for a in moved for b in moved):
        assert not score(edit, render(moved))["correct"]
    noisy = np.clip(np.asarray(render(edit.target), dtype=np.float64) + np.random.default_rng(0).normal(0, 20, (128, 128, 3)), 0, 255)
    result = score(edit, Image.fromarray(noisy.astype(np.uint8)))
    assert 21 < result["psnr"] < 25  # sigma-20 noise is 22.1 dB before clipping at 255


def _overlaps(a, b):
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return a != b and not (ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0)
