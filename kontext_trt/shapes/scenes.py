"""Procedural scenes of the shapes task and the four instruction kinds, drawn with Pillow.

A scene is 128x128 RGB on a (245, 245, 245) background with one to three shapes of different kinds (circle, square,
triangle), each 20 to 44 px across and not overlapping. An edit is (instruction, input scene or None, target scene).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SIZE = 128
BACKGROUND = (245, 245, 245)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
           "purple": (140, 60, 190), "orange": (245, 130, 30)}
KINDS = ("circle", "square", "triangle")
MIN_SPAN, MAX_SPAN = 20, 44
GAP = 4  # pixels kept free between two shapes' boxes
EDITS = ("recolour", "remove", "add", "generate")
# Seeds at or above this are held out: training draws below it, `eval` at and above it.
HELD_OUT_SEED = 1_000_000_000


@dataclass(frozen=True)
class Shape:
    """One filled shape: kind, colour name, top-left corner and span (its box is span x span pixels)."""

    kind: str
    colour: str
    x: int
    y: int
    span: int

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        return self.x, self.y, self.x + self.span, self.y + self.span

    def centre(self) -> tuple[float, float]:
        """The box centre in pixels."""
        return self.x + self.span / 2, self.y + self.span / 2


@dataclass(frozen=True)
class Edit:
    """One example of the task: the instruction, the input scene (None for text-to-image) and the target scene."""

    kind: str
    prompt: str
    source: tuple[Shape, ...] | None
    target: tuple[Shape, ...]
    touched: tuple[Shape, ...]  # the shapes the instruction changes, before and after (their boxes are not untouched)


def render(shapes: tuple[Shape, ...] | list[Shape]) -> Image.Image:
    """The scene as a 128x128 RGB image."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = s.x, s.y, s.x + s.span - 1, s.y + s.span - 1
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def fits(box: tuple[int, int, int, int], shapes: tuple[Shape, ...] | list[Shape]) -> bool:
    """Whether a box keeps GAP pixels from every shape's box."""
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0
               for a0, b0, a1, b1 in (s.box() for s in shapes))


def place(rng: random.Random, kind: str, colour: str, shapes: tuple[Shape, ...] | list[Shape],
          tries: int = 200) -> Shape | None:
    """A shape of this kind and colour at a random size and place that fits beside `shapes`, or None."""
    for _ in range(tries):
        span = rng.randint(MIN_SPAN, MAX_SPAN)
        x, y = rng.randint(2, SIZE - span - 2), rng.randint(2, SIZE - span - 2)
        shape = Shape(kind, colour, x, y, span)
        if fits(shape.box(), shapes):
            return shape
    return None


def random_scene(rng: random.Random, count: int | None = None) -> tuple[Shape, ...]:
    """One to three shapes of different kinds (count: exactly that many), each in a random colour."""
    count = count or rng.randint(1, 3)
    shapes: list[Shape] = []
    for kind in rng.sample(KINDS, count):
        shape = place(rng, kind, rng.choice(list(COLOURS)), shapes)
        if shape is not None:
            shapes.append(shape)
    return tuple(shapes)


def make_edit(rng: random.Random, kind: str) -> Edit:
    """A random example of one instruction kind (recolour, remove, add, generate)."""
    if kind == "generate":
        shape = place(rng, rng.choice(KINDS), rng.choice(list(COLOURS)), [])
        return Edit(kind, f"a {shape.colour} {shape.kind}", None, (shape,), (shape,))
    if kind == "add":
        while True:
            source = random_scene(rng, rng.randint(1, 2))
            missing = [k for k in KINDS if k not in {s.kind for s in source}]
            new = place(rng, rng.choice(missing), rng.choice(list(COLOURS)), source)
            if new is not None:
                return Edit(kind, f"add a {new.colour} {new.kind}", source, (*source, new), (new,))
    source = random_scene(rng)
    old = rng.choice(source)
    if kind == "remove":
        return Edit(kind, f"remove the {old.kind}", source, tuple(s for s in source if s != old), (old,))
    if kind == "recolour":
        new = replace(old, colour=rng.choice([c for c in COLOURS if c != old.colour]))
        return Edit(kind, f"make the {old.kind} {new.colour}", source,
                    tuple(new if s == old else s for s in source), (old, new))
    raise ValueError(f"unknown edit kind {kind!r}; choose one of {', '.join(EDITS)}")


def all_prompts() -> list[str]:
    """Every instruction the task can give (57 of them)."""
    return ([f"make the {k} {c}" for k in KINDS for c in COLOURS] + [f"remove the {k}" for k in KINDS]
            + [f"add a {c} {k}" for k in KINDS for c in COLOURS] + [f"a {c} {k}" for k in KINDS for c in COLOURS])


def held_out_edits(n: int, seed: int = 0) -> list[Edit]:
    """The first n held-out edits `eval` scores, the four kinds in turn, from seed HELD_OUT_SEED + seed."""
    rng = random.Random(HELD_OUT_SEED + seed)
    return [make_edit(rng, EDITS[i % len(EDITS)]) for i in range(n)]


# The edit `make demo` shows: held-out edit 88 (a recolour of a two-shape scene), picked because the shipped model
# gets it right; README gives how often it gets a recolour right.
DEMO_INDEX = 88


def demo_edit() -> Edit:
    """The demo's edit (held-out edit DEMO_INDEX)."""
    return held_out_edits(DEMO_INDEX + 1)[DEMO_INDEX]
