"""Calibration: ModelOpt max calibration of the recipe's quantizers, driven by the real Kontext edit loop, plus the
SVDQuant activation statistics (quant/svdquant.py) of the recipe's SVDQuant layers from the same edits."""
from __future__ import annotations

import contextlib
import io
import sys

import torch
from torch import nn

from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import family_named
from kontext_trt.core.timing import bar, is_quiet, progress
from kontext_trt.quant import svdquant
from kontext_trt.quant.calib_data import Pair
from kontext_trt.quant.export import transformer_stage
from kontext_trt.quant.recipe import Recipe, modelopt_config, svd_layers
from kontext_trt.runtime import flow


def calibrate(k: flow.Kontext, transformer: nn.Module, recipe: Recipe, pairs: list[Pair], steps: int,
              auto_resize: bool) -> dict[str, torch.Tensor]:
    """Edit every pair (seed = its index) with k's other stages and the transformer as ModelOpt quantizes it in
    calibration mode: quantizers record the amax of what they see over all denoising steps (target and context
    tokens alike) and leave the outputs untouched. Returns the amax of every quantized input and, for SVDQuant layers,
    their smoothing ('<linear>.smooth', '.alpha'; '.input' is then the amax of the smoothed input)."""
    import modelopt.torch.quantization as mtq

    stats, names = svdquant.ActivationStats(), svd_layers(recipe)

    def forward_loop(model: nn.Module) -> None:
        stage = transformer_stage(model, k.device, next(model.parameters()).dtype, family_named(k.config.family))
        calibrating = k.with_stages(transformer=stage)
        hooks = stats.attach(model, names)
        try:
            for i, pair in enumerate(bar(pairs, "calibration", unit="edit")):
                with progress(f"calibrating {i + 1}/{len(pairs)}: {pair.prompt!r} on {pair.source}, {steps} steps"):
                    flow.edit(calibrating, flow.EditRequest(prompts=[pair.prompt], image=pair.image, steps=steps,
                                                            seed=i, auto_resize=auto_resize))
        finally:
            for hook in hooks:
                hook.remove()

    # ModelOpt prints its progress: on stderr (stdout is for the report), nowhere under --quiet
    with contextlib.redirect_stdout(io.StringIO() if is_quiet() else sys.stderr):
        model = mtq.quantize(transformer, modelopt_config(recipe), forward_loop)
    amax = collect_amax(model, recipe)
    if names:
        with progress(f"SVDQuant smoothing of {len(names)} layers (alpha "
                      f"{'searched' if recipe.svd_alpha is None else recipe.svd_alpha})"):
            amax |= svdquant.smooth_layers(model, names, stats, recipe.svd_alpha)
    return amax


def collect_amax(model: nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """'<linear>.input' and '<attention>.q/.k/.v' amax (float32, 0-d) read from the calibrated ModelOpt quantizers."""
    modules = dict(model.named_modules())
    wanted = {f"{name}.input": (name, "input_quantizer") for name, fmt in recipe.layers.items() if fmt}
    wanted |= {f"{name}.{q}": (name, f"{q}_bmm_quantizer") for name in recipe.attention_layers for q in "qkv"}
    amax = {}
    for key, (name, attr) in wanted.items():
        value = getattr(modules[name], attr).amax
        if value is None:
            raise KontextError(f"{name}.{attr} saw no data during calibration: the calibration edits never reached "
                               "it; report this with your checkpoint's transformer config")
        amax[key] = value.detach().float().reshape(())
    return amax
