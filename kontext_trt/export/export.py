"""Export a checkpoint's stages to ONNX: one stage in memory at a time, each written atomically, then the manifest.

Exporter: torch.onnx.export(dynamo=True), i.e. torch.export. It is the maintained exporter (the TorchScript one
is deprecated), it checks the dynamic dims symbolically (a dim the model specialises fails the export instead of
being silently baked in), it writes weights to external data without a protobuf copy, and at opset >= 23 it emits
scaled_dot_product_attention as the ONNX Attention op, which TensorRT parses straight into IAttention.
"""
from __future__ import annotations

import gc
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kontext_trt.core import files
from kontext_trt.core.checks import check_output_folder
from kontext_trt.core.dtypes import DTYPES
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import (
    new_manifest,
    read_export_manifest,
    record_stage,
    stage_entry,
    tool_versions,
    write_manifest,
)
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, Family, family_named
from kontext_trt.core.onnx_dir import file_identity
from kontext_trt.core.stages import TRANSFORMER_PARTS
from kontext_trt.core.timing import bar, progress
from kontext_trt.core.weight_map import param_signatures, weight_map
from kontext_trt.export import onnx_file
from kontext_trt.export.rope import fp32_rope
from kontext_trt.export.specs import stage_dims
from kontext_trt.runtime.klein_stages import (
    Flux2TransformerModule,
    KleinVaeDecoderModule,
    KleinVaeEncoderModule,
    load_qwen3_text,
)
from kontext_trt.runtime.lora import LoraSpec, fuse_into
from kontext_trt.runtime.torch_stages import ClipModule, T5Module, TransformerModule, VaeDecoderModule, VaeEncoderModule

DEFAULT_OPSET = 23  # the first opset with the Attention op (TensorRT: IAttention)
MIN_OPSET, MAX_OPSET = 18, 23  # torch.export emits opset >= 18; TensorRT(-RTX) parses up to 23
EXTERNAL_THRESHOLD = 2 * 1024 ** 3  # protobuf's 2 GiB limit: heavier stages keep weights in model.onnx.data


def export_checkpoint(model: str | Path, out: str | Path, stages: tuple[str, ...] | None = None, dtype: str = "bf16",
                      opset: int = DEFAULT_OPSET, force: bool = False,
                      external_threshold: int = EXTERNAL_THRESHOLD, loras: Sequence[LoraSpec] = ()) -> Path:
    """Export `stages` (default: every stage of the checkpoint's family) of the checkpoint at `model` into `out` (one
    folder per stage) and return the manifest path; `loras` [(file or folder, scale), ...] are fused into the
    transformer's weights for good."""
    from kontext_trt.core import checkpoint as ck
    from kontext_trt.runtime.flow import KontextConfig

    ckpt = ck.open_checkpoint(model)
    family = family_named(ckpt.family)
    stages = stages or family.stage_names
    check_request(stages, dtype, opset, family)
    if loras and set(stages) & set(TRANSFORMER_PARTS):
        raise KontextError("--lora is fused into the single transformer only: export the step-cache parts "
                           f"({','.join(TRANSFORMER_PARTS)}) without --lora and pass the LoRA at run time (edit "
                           "--lora), which reaches the parts too")
    out = prepare_folder(Path(out))
    fingerprint = ck.checkpoint_fingerprint(ckpt)
    fresh = new_manifest(ckpt.root, fingerprint, KontextConfig.from_checkpoint(ckpt).to_dict())
    with files.folder_lock(out):  # a sibling export into `out` reads and writes the manifest under the same lock
        manifest = read_export_manifest(out)
        if manifest is not None and manifest.fingerprint != fingerprint:
            if not force:
                raise KontextError(f"{out} holds an export of another checkpoint ({manifest.checkpoint['path']}); "
                                   f"choose another --out or pass --force to replace it", param="out")
            for stage in manifest.stages:
                shutil.rmtree(out / stage, ignore_errors=True)
            manifest = None
        write_manifest(out, replace(manifest or fresh, tools=tool_versions()))
    with progress(f"copying the tokenizers to {out}"):
        copy_tokenizers(ckpt, out)
    for stage in bar(stages, "export", unit="stage"):
        with progress(f"exporting {stage} ({dtype}, opset {opset}) to {out / stage}"):
            entry = export_stage(ckpt, stage, dtype, opset, out, external_threshold, loras, family)
        record_stage(out, stage, entry, fresh)
    return out / "manifest.json"


def export_stage(ckpt, stage: str, dtype: str, opset: int, out: Path, external_threshold: int,
                 loras: Sequence[LoraSpec] = (), family: Family = FLUX1_KONTEXT) -> dict:
    """Load one stage (the transformer with `loras` fused), trace, free it, clean and check the graph, then swap
    out/stage in; its manifest entry (the transformer's with its weight map, export.weight_map)."""
    tmp = temp_folder(out, stage)
    try:
        module = STAGE_LOADERS[family.name](ckpt, stage, DTYPES[dtype])
        baked = fuse_into(module.model, loras) if stage == "transformer" else []
        signatures, kept = stage_signatures(stage, module)
        onnx_file.trace(module, stage, ckpt.transformer_config, DTYPES[dtype], opset, tmp, ckpt.text_length, family)
        del module
        gc.collect()
        entry = finish_stage(tmp, out, stage, dtype, opset, external_threshold, family=family)
        if signatures:
            entry["weights"] = weight_map(signatures, out / entry["file"], kept)
        if baked:
            entry["loras"] = [lora.describe() for lora in baked]
        return entry
    except OSError as error:
        raise KontextError(f"{stage}: writing the ONNX failed ({error}); nothing was left in {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_signatures(stage: str, module: nn.Module) -> tuple[dict, dict[str, str] | None]:
    """The weight signatures of the transformer or one of its parts, by FluxTransformer2DModel parameter name, and the
    initializer name the exporter keeps each under when it keeps its own (None: model.<name>, the transformer's);
    ({}, None) for the other stages. LoRAs and refits find the weights through the map made of them."""
    if stage == "transformer":
        return param_signatures(module.model), None
    if stage not in TRANSFORMER_PARTS:
        return {}, None
    from kontext_trt.runtime.transformer_parts import diffusers_names

    names = diffusers_names(stage, module)
    return {names[n]: sig for n, sig in param_signatures(module).items()}, {names[n]: n for n in names}


def finish_stage(tmp: Path, out: Path, stage: str, dtype: str, opset: int, external_threshold: int,
                 precision: str | None = None, family: Family = FLUX1_KONTEXT) -> dict:
    """Clean and check the graph traced into tmp, swap it in as out/stage; its manifest entry."""
    model, external = onnx_file.clean(tmp, stage, external_threshold, family)
    onnx_file.save(model, tmp, external)
    entry = stage_entry(stage, external, onnx_file.weight_bytes(model), dtype, opset,
                        onnx_file.describe(model.graph.input), onnx_file.describe(model.graph.output),
                        stage_dims(stage, family))
    if precision is not None:
        entry["precision"] = precision
    entry["sha256"] = file_identity(tmp / "model.onnx")
    replace_folder(tmp, out / stage)
    return entry


def load_stage(ckpt, stage: str, dtype: torch.dtype) -> nn.Module:
    """Only this stage's module, in dtype: the VAE half a stage does not use is dropped straight away."""
    from kontext_trt.core import checkpoint as ck
    if stage == "clip":
        return ClipModule(ck.load_clip(ckpt, dtype))
    if stage == "t5":
        t5 = ck.load_t5(ckpt, dtype)
        t5.set_attn_implementation("eager")  # torch.export of T5's sdpa path fails on a dynamic batch (a view)
        return T5Module(t5)
    if stage == "transformer":
        return TransformerModule(fp32_rope(ck.load_transformer(ckpt, dtype)))
    if stage in TRANSFORMER_PARTS:
        from kontext_trt.runtime.transformer_parts import transformer_parts

        return transformer_parts(fp32_rope(ck.load_transformer(ckpt, dtype)))[stage]
    vae = ck.load_vae(ckpt, dtype)
    if stage == "vae_encoder":
        del vae.decoder, vae.post_quant_conv
        return VaeEncoderModule(vae)
    del vae.encoder, vae.quant_conv
    return VaeDecoderModule(vae)


def load_klein_stage(ckpt, stage: str, dtype: torch.dtype) -> nn.Module:
    """One FLUX.2 [klein] stage's module (runtime.klein_stages), in dtype; the transformer with fp32 RoPE."""
    from kontext_trt.core import klein_checkpoint as kc

    if stage == "text_encoder":
        return load_qwen3_text(ckpt, dtype)
    if stage == "transformer":
        return Flux2TransformerModule(fp32_rope(kc.load_klein_transformer(ckpt, dtype)))
    vae = kc.load_klein_vae(ckpt, dtype)
    if stage == "vae_encoder":
        vae.decoder = vae.post_quant_conv = None
        return KleinVaeEncoderModule(vae)
    vae.encoder = vae.quant_conv = None
    return KleinVaeDecoderModule(vae)


STAGE_LOADERS = {FLUX1_KONTEXT.name: load_stage, FLUX2_KLEIN.name: load_klein_stage}


def check_request(stages: tuple[str, ...], dtype: str, opset: int, family: Family = FLUX1_KONTEXT) -> None:
    """Refuse stages the family does not have, unknown dtypes and opsets, and fp16 for T5, with one line each."""
    unknown = [s for s in stages if s not in (*family.stage_names, *family.parts)]
    if unknown or not stages:
        also = f" (and {','.join(family.parts)} for step caching)" if family.parts else ""
        raise KontextError(f"unknown stage {unknown[0] if unknown else '(none)'!r} for a {family.label} checkpoint: "
                           f"choose from {','.join(family.stage_names)}{also}")
    if dtype not in DTYPES:
        raise KontextError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    if dtype == "fp16" and "t5" in stages:
        raise KontextError("T5 overflows in fp16: export t5 in bf16 or fp32 (or leave it out of --stages)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise KontextError(f"opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


def prepare_folder(out: Path) -> Path:
    """Create the output folder, or fail with one line if it cannot be written."""
    check_output_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KontextError(f"cannot create the output folder {out} ({error.strerror}): choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise KontextError(f"output folder {out} is not writable: choose another --out")
    return out


def copy_tokenizers(ckpt, out: Path) -> None:
    """Save the checkpoint's tokenizers into the family's folders (FLUX.1: out/tokenizer and out/tokenizer_2; klein:
    out/tokenizer), atomically."""
    from kontext_trt.core import checkpoint as ck
    for tokenizer, name in zip(ck.load_tokenizers(ckpt), family_named(ckpt.family).tokenizers.values()):
        tmp = temp_folder(out, name)
        try:
            tokenizer.save_pretrained(tmp)
            replace_folder(tmp, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def temp_folder(out: Path, name: str) -> Path:
    """A fresh hidden out/.name.PID-RANDOM.tmp folder to build `name` in; those of killed exports are removed first
    (a live sibling's are left alone)."""
    files.remove_stale_temps(out, name)
    return files.temp_dir(out / name)


def replace_folder(new: Path, final: Path) -> None:
    """Move a finished folder into place, replacing (then deleting) any previous one, under the folder's lock."""
    with files.folder_lock(final.parent):
        files.replace_dir(new, final)
