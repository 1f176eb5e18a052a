"""Export the quantized transformer from a saved calibration: DIR/transformer/model.onnx and DIR/manifest.json.

The graph is export/'s transformer graph (same I/O names, dynamic dims, fp32 RoPE, manifest schema) with the Q/DQ
ops of quant/ops.py; the manifest records precision "fp8" or "nvfp4". The other stages are plain exports: add them
with `kontext-trt export --model M --out DIR --stages clip,t5,vae_encoder,vae_decoder` (same checkpoint: the manifest
is shared), then `kontext-trt build --onnx DIR --precision fp8|nvfp4`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kontext_trt.core import checkpoint as ck
from kontext_trt.core import klein_checkpoint as kc
from kontext_trt.core.dtypes import DTYPES
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import new_manifest, read_export_manifest, record_stage
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, Family, family_named
from kontext_trt.core.timing import progress
from kontext_trt.export import onnx_file
from kontext_trt.export.export import DEFAULT_OPSET, EXTERNAL_THRESHOLD, copy_tokenizers, finish_stage, temp_folder
from kontext_trt.export.rope import fp32_rope
from kontext_trt.export.specs import dynamic_shapes, sample_inputs
from kontext_trt.quant import ops
from kontext_trt.quant.qmodel import quantize_transformer
from kontext_trt.quant.state import load_state
from kontext_trt.runtime.flow import KontextConfig
from kontext_trt.runtime.klein_stages import Flux2TransformerModule
from kontext_trt.runtime.torch_stages import TorchStage, TransformerModule

STAGE = "transformer"
# Per family: the checkpoint's transformer loader and the stage module with the family's engine I/O names.
TRANSFORMERS = {FLUX1_KONTEXT.name: (ck.load_transformer, TransformerModule),
                FLUX2_KLEIN.name: (kc.load_klein_transformer, Flux2TransformerModule)}


def export_quantized(model: str | Path, out: str | Path, dtype: str = "bf16", opset: int = DEFAULT_OPSET,
                     external_threshold: int = EXTERNAL_THRESHOLD) -> Path:
    """Trace the transformer of checkpoint `model` quantized as out/quant says into out/transformer; the manifest."""
    out = Path(out)
    if dtype not in ("bf16", "fp32"):
        raise KontextError(f"quantized export dtype {dtype!r}: use bf16 (TensorRT) or fp32 (ONNX Runtime)")
    state = load_state(out)
    if state is None:
        raise KontextError(f"no calibration in {out}: run `kontext-trt quantize --out {out}` first")
    recipe, amax = state
    ckpt = ck.open_checkpoint(model)
    fingerprint = ck.checkpoint_fingerprint(ckpt)
    if fingerprint != recipe.checkpoint["fingerprint"]:
        raise KontextError(f"{out} was calibrated on {recipe.checkpoint['path']}, not on {model}: quantize this "
                           "checkpoint into another folder")
    fresh = new_manifest(ckpt.root, fingerprint, KontextConfig.from_checkpoint(ckpt).to_dict())
    manifest = read_export_manifest(out) or fresh
    if manifest.fingerprint != fingerprint:
        raise KontextError(f"{out} holds an export of another checkpoint ({manifest.checkpoint['path']}): "
                           "quantize into another folder")
    copy_tokenizers(ckpt, out)  # the manifest names them, as export/'s does
    with progress(f"exporting the {recipe.precision} transformer ({dtype}, opset {opset}) to {out / STAGE}"):
        entry = export_stage(ckpt, recipe, amax, dtype, opset, out, external_threshold)
    entry |= {"svd_rank": recipe.svd_rank} if recipe.precision == "nvfp4" else {}
    return record_stage(out, STAGE, entry, fresh)


def export_stage(ckpt, recipe, amax: dict, dtype: str, opset: int, out: Path, external_threshold: int) -> dict:
    """Build, trace, clean and check the quantized transformer in a temp folder, then swap it in; its manifest entry."""
    tmp = temp_folder(out, STAGE)
    try:
        quantized = quantize_transformer(fused_transformer(ckpt, DTYPES[dtype], recipe.loras), recipe, amax,
                                         DTYPES[dtype])
        family = family_named(ckpt.family)
        trace(TRANSFORMERS[family.name][1](fp32_rope(quantized)), ckpt.transformer_config, DTYPES[dtype], opset, tmp,
              ckpt.text_length, family)
        del quantized
        entry = finish_stage(tmp, out, STAGE, dtype, opset, external_threshold, recipe.precision, family)
        if recipe.loras:
            entry["loras"] = [{"file": Path(path).name, "scale": scale} for path, scale in recipe.loras]
        return entry
    except OSError as error:
        raise KontextError(f"{STAGE}: writing the ONNX failed ({error}); nothing was left in {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fused_transformer(ckpt, dtype: torch.dtype, loras: list) -> torch.nn.Module:
    """The checkpoint's transformer (its family's model) with LoRAs [[file, scale]] fused into its weights for good."""
    from kontext_trt.runtime.lora import fuse_into

    model = TRANSFORMERS[ckpt.family][0](ckpt, dtype)
    fuse_into(model, [tuple(lora) for lora in loras])
    return model


def transformer_stage(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, family: Family) -> TorchStage:
    """A transformer stage of the torch backend over `model`, with its family's module and I/O names."""
    return TorchStage(STAGE, TRANSFORMERS[family.name][1](model).to(device), device, dtype, io=family.io(STAGE))


def trace(module: torch.nn.Module, transformer_config: dict, dtype: torch.dtype, opset: int, folder: Path,
          text_length: int, family: Family = FLUX1_KONTEXT) -> None:
    """onnx_file.trace with the Q/DQ ops' ONNX translations: folder/raw.onnx + raw.onnx.data."""
    ops.register_trt_schema()
    inputs, outputs = family.io(STAGE)
    program = torch.onnx.export(
        module.eval(), (), kwargs=sample_inputs(STAGE, transformer_config, dtype, text_length, family), dynamo=True,
        opset_version=opset, input_names=list(inputs), output_names=list(outputs),
        dynamic_shapes=dynamic_shapes(STAGE, family), custom_translation_table=ops.TRANSLATIONS, optimize=True,
        verbose=False)
    program.save(folder / onnx_file.RAW, external_data=True)
    del program
    onnx_file.forget_last_graph()
