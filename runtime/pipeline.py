"""Assemble a Kontext pipeline from a checkpoint and a backend."""
from __future__ import annotations

from pathlib import Path

import torch

from kontext_trt.runtime.checks import check_device
from kontext_trt.runtime.errors import KontextError
from kontext_trt.runtime.flow import Kontext, KontextConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """torch.device for a --device value, refusing cuda where no GPU is visible."""
    check_device(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KontextError("--device cuda was given but no CUDA GPU is visible: use --device cpu")
    return dev


def load_kontext(model: str | Path | None, backend: str = "torch", dtype: str = "bf16", device: str = "cpu",
                 onnx: Path | None = None, engines: Path | None = None, loras: list[tuple[str | Path, float]] = (),
                 **trt_options) -> Kontext:
    """Load a checkpoint's stages on a backend (onnxruntime: an export folder `onnx`; tensorrt: the engine cache
    `engines` with trt_stages.load_trt_kontext's options, precision included: dtype is the torch backend's), with
    tokenizers and config, and the transformer's LoRAs [(file or folder, scale), ...] applied (Kontext.set_loras)."""
    k = _load_kontext(model, backend, dtype, device, onnx, engines, **trt_options)
    if loras:
        k.set_loras(list(loras))
    return k


def _load_kontext(model: str | Path | None, backend: str, dtype: str, device: str, onnx: Path | None,
                  engines: Path | None, **trt_options) -> Kontext:
    """load_kontext without the LoRAs."""
    from kontext_trt.runtime import checkpoint as ck
    from kontext_trt.runtime.torch_stages import torch_stages

    if backend == "tensorrt":
        from kontext_trt.runtime.trt_stages import load_trt_kontext

        if engines is None:
            raise KontextError("--backend tensorrt needs --engines DIR (made by `kontext-trt build`)")
        return load_trt_kontext(engines, onnx=onnx, model=model, **trt_options)
    if backend == "onnxruntime":
        from kontext_trt.runtime.ort_stages import load_ort_kontext

        if onnx is None:
            raise KontextError("--backend onnxruntime needs --onnx DIR (made by `kontext-trt export`)")
        return load_ort_kontext(onnx, resolve_device(device))
    if backend != "torch":
        raise KontextError(f"unknown backend {backend!r}: use torch, onnxruntime or tensorrt")
    dev = resolve_device(device)
    ckpt = ck.open_checkpoint(model)
    clip_tok, t5_tok = ck.load_tokenizers(ckpt)
    info = {"backend": backend, "dtype": dtype, "checkpoint": ck.checkpoint_fingerprint(ckpt)[:16]}
    return Kontext(torch_stages(ckpt, DTYPES[dtype], str(dev)), clip_tok, t5_tok,
                   KontextConfig.from_checkpoint(ckpt), dev, info=info)
