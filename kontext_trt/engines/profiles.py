"""Optimization profiles from the Kontext resolution buckets: one (min, opt, max) range per named axis, then per input.

Axes: B batch, L transformer image tokens (target N + context M), H/W pixels, h/w latent (pixels / 8; FLUX.2 [klein]:
/ 16), S the text tokens (fixed: the export manifest's KontextConfig.text_length, 512 for FLUX.1 Kontext [dev] and
klein). Klein's L covers the target and up to 4 references, each at most the largest size. A WxH image
has (H/16)*(W/16) tokens. The VAE encoder's batch is always 1: the one context image is encoded once per edit, whatever
the batch of prompts. The transformer range runs from text-to-image at the smallest size (no context) to an edit
at the largest size with the largest context; opt is a 1024x1024 edit of a 1024x1024 image (batch: its smallest).
"""
from __future__ import annotations

from dataclasses import dataclass

from kontext_trt.core import image
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, Family
from kontext_trt.core.image import KONTEXT_BUCKETS, MULTIPLE
from kontext_trt.core.text import CLIP_LEN

OPT_SIZE = (1024, 1024)
# --weight-streaming applies here only: the runtime streams the transformer's weights (split for step caching: the
# body's, all blocks but the first), and on TensorRT-RTX a streaming engine cannot take user-allocated memory, so its
# contexts could not be captured in the runtime's CUDA graphs.
STREAMED_STAGES = ("transformer", "transformer_body")
Range = tuple[int, int, int]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

# Each input's axes: a letter is an axis from the request, an int the contract's size (used when the ONNX leaves that
# dimension symbolic), None a size only the ONNX knows (channels, widths).
STAGE_AXES: dict[str, dict[str, tuple[str | int | None, ...]]] = {
    "clip": {"input_ids": ("B", CLIP_LEN)},
    "t5": {"input_ids": ("B", "S")},
    "vae_encoder": {"images": (1, 3, "H", "W")},
    "vae_decoder": {"latent": ("B", 16, "h", "w")},
    "transformer": {
        "hidden_states": ("B", "L", None), "encoder_hidden_states": ("B", "S", None),
        "pooled_projections": ("B", None), "timestep": ("B",), "img_ids": ("L", 3),
        "txt_ids": ("S", 3), "guidance": ("B",),
    },
}
# The transformer split for step caching (runtime/stages.py): the same B and L axes, hidden widths from the ONNX.
STAGE_AXES["transformer_head"] = STAGE_AXES["transformer"]
STAGE_AXES["transformer_body"] = {
    "block_hidden_states": ("B", "L", None), "block_encoder_hidden_states": ("B", "S", None),
    "temb": ("B", None), "img_ids": ("L", 3), "txt_ids": ("S", 3),
}
STAGE_AXES["transformer_tail"] = {"final_hidden_states": ("B", "L", None), "temb": ("B", None)}
# FLUX.2 [klein] (core.family): Qwen3 ids and mask, 4-axis ids, each reference VAE-encoded on its own (batch 1), the
# decoder's latent cells 16 pixels (the stages patchify), its channels (4C) from the ONNX.
KLEIN_STAGE_AXES: dict[str, dict[str, tuple[str | int | None, ...]]] = {
    "text_encoder": {"input_ids": ("B", "S"), "attention_mask": ("B", "S")},
    "vae_encoder": {"images": (1, 3, "H", "W")},
    "vae_decoder": {"latent": ("B", None, "h", "w")},
    "transformer": {"hidden_states": ("B", "L", None), "encoder_hidden_states": ("B", "S", None), "timestep": ("B",),
                    "img_ids": ("L", 4), "txt_ids": ("S", 4)},
}


@dataclass(frozen=True)
class FamilyAxes:
    """What a family's profiles are made of: each stage's input axes and pixels per decoder latent cell (the h/w
    axes). How many reference images an edit adds to the transformer's tokens (the L axis) is the family's own
    max_references."""

    stage_axes: dict[str, dict[str, tuple[str | int | None, ...]]]
    latent_cell: int


FAMILY_AXES = {FLUX1_KONTEXT.name: FamilyAxes(STAGE_AXES, 8), FLUX2_KLEIN.name: FamilyAxes(KLEIN_STAGE_AXES, 16)}


@dataclass(frozen=True)
class Shapes:
    """The shape range an engine set covers: image sizes (w, h), batch (lo, hi), static or dynamic."""

    sizes: tuple[tuple[int, int], ...] = KONTEXT_BUCKETS
    batch: tuple[int, int] = (1, 1)
    static: bool = False


def tokens(width: int, height: int) -> int:
    """Transformer tokens of a WxH image: (H/16) * (W/16)."""
    return (height // MULTIPLE) * (width // MULTIPLE)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'all' (the 17 Kontext buckets) or 'WxH,WxH,...' (runtime.image.parse_sizes)."""
    if text == "all":
        return KONTEXT_BUCKETS
    return tuple(image.parse_sizes(text))


def format_sizes(sizes: tuple[tuple[int, int], ...]) -> str:
    """The --sizes value that gives back these sizes."""
    return "all" if set(sizes) == set(KONTEXT_BUCKETS) else ",".join(f"{w}x{h}" for w, h in sizes)


def parse_batch(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1-4' -> (1, 4)."""
    try:
        lo, _, hi = text.partition("-")
        batch = int(lo), int(hi or lo)
    except ValueError:
        raise KontextError(f"batch {text!r} is not N or LO-HI: write it like 1 or 1-4") from None
    if not 1 <= batch[0] <= batch[1]:
        raise KontextError(f"batch {text}: need 1 <= LO <= HI")
    return batch


def opt_size(sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """1024x1024 when among the sizes, else the size whose token count is nearest to it."""
    return OPT_SIZE if OPT_SIZE in sizes else min(sizes, key=lambda s: (abs(tokens(*s) - tokens(*OPT_SIZE)), s))


def token_ranges(shapes: Shapes, family: Family = FLUX1_KONTEXT) -> dict[str, Range]:
    """(min, opt, max) tokens for the target, the context (0: text-to-image; up to the family's most references, each
    at most the largest size) and both together (the L axis); opt is an edit from one reference of the opt size."""
    counts = [tokens(*s) for s in shapes.sizes]
    opt, refs = tokens(*opt_size(shapes.sizes)), family.max_references
    if shapes.static:
        return {"target": (opt, opt, opt), "context": (opt, opt, refs * opt),
                "total": (2 * opt, 2 * opt, (1 + refs) * opt)}
    return {"target": (min(counts), opt, max(counts)), "context": (0, opt, refs * max(counts)),
            "total": (min(counts), 2 * opt, (1 + refs) * max(counts))}


def axis_ranges(shapes: Shapes, text_length: int | None = None, family: Family = FLUX1_KONTEXT) -> dict[str, Range]:
    """(min, opt, max) of every axis letter for these shapes and this family; S (text tokens) only with a
    text_length, the export manifest's (without one, the ONNX's own static text size is the profile's)."""
    cell = FAMILY_AXES[family.name].latent_cell
    widths, heights = [w for w, _ in shapes.sizes], [h for _, h in shapes.sizes]
    ow, oh = opt_size(shapes.sizes)
    if shapes.static:
        widths, heights = [ow], [oh]
    lo, hi = shapes.batch
    return {
        "B": (lo, lo, hi), "L": token_ranges(shapes, family)["total"],
        "W": (min(widths), ow, max(widths)), "H": (min(heights), oh, max(heights)),
        "w": (min(widths) // cell, ow // cell, max(widths) // cell),
        "h": (min(heights) // cell, oh // cell, max(heights) // cell),
        **({"S": (text_length, text_length, text_length)} if text_length is not None else {}),
    }


def request_axes(width: int, height: int, context: tuple[int, int] | None, batch: int,
                 references: tuple[tuple[int, int], ...] = (),
                 family: Family = FLUX1_KONTEXT) -> list[tuple[str, dict[str, int]]]:
    """The axis values one request needs, per stage of the family: the transformer's L its target and every
    reference, the VAE encoder each reference (`context` the first, `references` the others), once, at batch 1; the
    decoder the output."""
    rules, cell = FAMILY_AXES[family.name].stage_axes, FAMILY_AXES[family.name].latent_cell
    images = [context, *references] if context else []
    n = tokens(width, height) + sum(tokens(*size) for size in images)
    axes = {stage: {"B": batch} for stage in rules if not stage.startswith(("vae_", "transformer"))}
    axes["transformer"] = {"B": batch, "L": n}
    axes["vae_decoder"] = {"B": batch, "W": width, "H": height, "w": width // cell, "h": height // cell}
    axes.update({part: axes["transformer"] for part in rules if part.startswith("transformer_")})
    return [*axes.items(), *(("vae_encoder", {"B": 1, "W": w, "H": h, "w": w // cell, "h": h // cell})
                             for w, h in images)]


def stage_profile(stage: str, onnx_shapes: dict[str, tuple[int | str, ...]], axes: dict[str, Range],
                  family: Family = FLUX1_KONTEXT) -> Profile:
    """min/opt/max shape of each ONNX input of a family's stage: ONNX static sizes, else contract sizes, else axis
    ranges."""
    rules, profile = FAMILY_AXES[family.name].stage_axes[stage], {}
    for name, dims in onnx_shapes.items():
        rule = rules.get(name)
        if rule is None or len(rule) != len(dims):
            raise KontextError(f"{stage} input {name} with shape {list(dims)} is not in the stage contract "
                               f"(expected {sorted(rules)} with ranks {[len(r) for r in rules.values()]})")
        shape: list[Range] = []
        for axis, (dim, want) in enumerate(zip(dims, rule)):
            if want == "S" and "S" not in axes:
                want = None  # no export manifest: the ONNX's own static text size
            if isinstance(want, str):
                lo, opt, hi = axes[want]
                if isinstance(dim, int) and want == "S" and (lo, hi) != (dim, dim):
                    raise KontextError(f"{stage} input {name} has {dim} T5 tokens in the ONNX but its export manifest "
                                       f"says text_length {lo}: re-export it with `kontext-trt export --force`")
                if isinstance(dim, int) and (lo, hi) != (dim, dim):
                    raise KontextError(f"{stage} input {name} has a fixed size {dim} on axis {axis} ({want}) in the "
                                       f"ONNX but the build asks for {lo}..{hi}: export it with a dynamic {want} axis "
                                       "or build with a matching --sizes/--batch/--static")
                shape.append((lo, opt, hi))
            elif isinstance(dim, int):
                shape.append((dim, dim, dim))
            elif want is not None:
                shape.append((want, want, want))
            else:
                raise KontextError(f"{stage} input {name} axis {axis} is symbolic ({dim}) in the ONNX: export it with "
                                   "a fixed size")
        profile[name] = tuple(tuple(s[i] for s in shape) for i in range(3))
    return profile
