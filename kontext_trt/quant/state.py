"""DIR/quant/: the saved calibration, so exporting (and re-running) never calibrates again.

    recipe.json        quant.recipe.Recipe: precision, attention, every layer's format, checkpoint, calibration
    amax.safetensors   float32 0-d tensors: "<linear>.input" for every quantized linear's input and
                       "<attention>.q" / ".k" / ".v" for FP8 attention (ModelOpt max calibration);
                       SVDQuant layers: "<linear>.smooth" (K,) smoothing, "<linear>.alpha" and ".input" the amax of
                       the smoothed input (quant/svdquant.py)

Weight scales and SVDQuant's low-rank factors are not saved: they follow from the weights (and the smoothing) and are
recomputed from the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import write_atomic, write_json
from kontext_trt.quant.recipe import FORMAT_VERSION, Recipe

FOLDER, RECIPE, AMAX = "quant", "recipe.json", "amax.safetensors"


def save_state(out: Path, recipe: Recipe, amax: dict[str, torch.Tensor]) -> Path:
    """Write recipe.json and amax.safetensors into out/quant, each atomically (amax first: a recipe means complete)."""
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / AMAX, lambda tmp: save_file({k: v.float().contiguous() for k, v in amax.items()}, str(tmp)))
    write_json(folder / RECIPE, recipe.to_dict(), indent=2)
    return folder


def load_state(out: Path) -> tuple[Recipe, dict[str, torch.Tensor]] | None:
    """The saved recipe and amax of out/quant, None when there is none; a KontextError when it is unusable."""
    folder = Path(out) / FOLDER
    if not (folder / RECIPE).is_file():
        return None
    try:
        data = json.loads((folder / RECIPE).read_text(encoding="utf-8"))
        amax = load_file(str(folder / AMAX))
    except (OSError, ValueError) as error:
        raise KontextError(f"{folder} holds an unreadable calibration ({error}); delete the folder and quantize "
                           "again") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise KontextError(f"{folder / RECIPE}: format_version {data.get('format_version')} is not {FORMAT_VERSION}; "
                           "delete the folder and quantize again")
    return Recipe.from_dict(data), amax
