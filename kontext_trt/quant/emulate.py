"""A torch pipeline's transformer swapped for the fake-quantized one of a `kontext-trt quantize` folder: the bit-exact
FP8 / NVFP4 emulation of quant/formats.py (qmodel.QuantLinear, FP8 attention) that the quality report runs, built from
the folder's saved calibration (DIR/quant) and the checkpoint, on any device. It runs where the Q/DQ ONNX cannot (NVFP4
needs a Blackwell GPU), so a quantized edit can be scored anywhere (`kontext-trt eval --quantized DIR`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.quant.export import fused_transformer
from kontext_trt.quant.qmodel import quantize_transformer
from kontext_trt.quant.state import load_state
from kontext_trt.runtime.flow import Kontext
from kontext_trt.runtime.torch_stages import TorchStage, TransformerModule
from kontext_trt.runtime.transformer_parts import transformer_parts


def emulated_stages(folder: str | Path, model: str | Path, dtype: torch.dtype,
                    device: torch.device) -> tuple[dict[str, TorchStage], str]:
    """The fake-quantized transformer of `folder` (calibrated on checkpoint `model`) in dtype on device, with its three
    step-cache parts over the same modules; and its precision ("fp8" or "nvfp4")."""
    from kontext_trt.core import checkpoint as ck

    state = load_state(Path(folder))
    if state is None:
        raise KontextError(f"{folder}: no saved calibration ({Path(folder) / 'quant'}); make one with `kontext-trt "
                           f"quantize --model {model} --out {folder} --precision fp8|nvfp4`")
    recipe, amax = state
    ckpt = ck.open_checkpoint(model)
    if ck.checkpoint_fingerprint(ckpt) != recipe.checkpoint.get("fingerprint"):
        raise KontextError(f"{folder} was calibrated on {recipe.checkpoint.get('path')}, not on {model}: pass that "
                           "checkpoint as --model, or quantize this one")
    model_q = quantize_transformer(fused_transformer(ckpt, dtype, recipe.loras), recipe, amax, dtype).to(device)
    stages = {"transformer": TorchStage("transformer", TransformerModule(model_q), device, dtype)}
    for name, part in transformer_parts(model_q).items():
        stages[name] = TorchStage(name, part, device, dtype, "transformer")
    return stages, recipe.precision


def refusal(backend: str) -> str:
    """Why --quantized cannot run on this backend, in one line."""
    return (f"--quantized emulates the quantized transformer on the torch backend, not on {backend}: drop "
            "--backend/--onnx/--engines and pass --model CHECKPOINT (the Q/DQ ONNX itself runs with --backend "
            "onnxruntime --onnx DIR)")


def with_emulated(k: Kontext, folder: str | Path) -> Kontext:
    """k (a torch pipeline over a checkpoint) with its transformer fake-quantized as `folder` says, in k's transformer
    dtype; info.precision says which format, emulated."""
    stage = k.stages.get("transformer")
    if k.info.backend != "torch" or not isinstance(stage, TorchStage):
        raise KontextError(refusal(k.info.backend))
    if k.info.loras:
        raise KontextError("--quantized runs the transformer as it was quantized, with the LoRAs `kontext-trt quantize "
                           "--lora` fused in: drop --lora")
    stages, precision = emulated_stages(folder, k.info.source, stage.dtype, k.device)
    emulated = k.with_stages(**stages)
    emulated.info = replace(k.info, precision=f"{precision} (emulated)", source=f"{k.info.source} + {folder}")
    return emulated
