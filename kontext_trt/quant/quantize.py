"""`kontext-trt quantize` end to end: check the request, calibrate (once), report against bf16, export the Q/DQ ONNX.

Every step after calibration starts from the saved state in DIR/quant, never from the calibrated ModelOpt modules, so a
second run with the same settings reuses the calibration, and exporting only needs the saved state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_trt.core.checks import resolve_device
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, family_named
from kontext_trt.core.timing import note
from kontext_trt.export.export import prepare_folder
from kontext_trt.quant import calib_data, state, svdquant
from kontext_trt.quant import recipe as rc
from kontext_trt.quant.calibrate import calibrate
from kontext_trt.quant.export import export_quantized, fused_transformer
from kontext_trt.quant.export import transformer_stage as family_transformer_stage
from kontext_trt.quant.qmodel import quantize_transformer
from kontext_trt.quant.report import quality_report, write_report
from kontext_trt.runtime.flow import Kontext, KontextConfig, PipelineInfo
from kontext_trt.runtime.klein_stages import KleinVaeDecoderModule, KleinVaeEncoderModule, load_qwen3_text
from kontext_trt.runtime.torch_stages import (
    ClipModule,
    T5Module,
    TorchStage,
    VaeDecoderModule,
    VaeEncoderModule,
)

REFERENCE = torch.bfloat16  # the transformer is calibrated in, and compared against, bf16


@dataclass
class QuantizeRequest:
    """Everything `kontext-trt quantize` takes."""

    model: Path
    precision: str
    out: Path
    calib: Path | None = None
    calib_size: int = 32
    calib_steps: int = 20
    attention: str | None = None
    report_size: int = 4
    dtype: str = "bf16"  # of the exported ONNX
    auto_resize: bool = True
    device: str = "cpu"
    loras: tuple = ()  # [(file or folder, scale)]: fused into the transformer before calibration (runtime.lora)
    svd_rank: int | None = None  # SVDQuant rank of the nvfp4 layers; None: 32 for nvfp4, 0 (plain) for fp8
    svd_alpha: float | None = None  # SVDQuant smoothing strength; None: searched per layer
    export: bool = True  # write the Q/DQ ONNX after the report (measurements skip it)


def quantize(req: QuantizeRequest) -> dict:
    """Run a quantization request; the quality report (also in req.out/report.json and report.md)."""
    ckpt, attention, pairs = check_request(req)
    device = resolve_device(req.device)
    loras = [[str(Path(path).resolve()), float(scale)] for path, scale in req.loras]
    transformer = fused_transformer(ckpt, REFERENCE, loras)
    k = reference_kontext(ckpt, device, transformer)
    recipe = recipe_for(transformer, ckpt, req, attention, pairs)
    recipe.loras = loras
    prepare_folder(req.out)
    if not ensure_calibration(k, transformer, recipe, pairs, req):  # calibration instrumented k's transformer
        k = k.with_stages(transformer=transformer_stage(fused_transformer(ckpt, REFERENCE, loras), device, ckpt))
    del transformer
    recipe, amax = state.load_state(req.out)
    quantized = transformer_stage(quantize_transformer(fused_transformer(ckpt, REFERENCE, loras), recipe, amax,
                                                       REFERENCE), device, ckpt)
    info = {"precision": recipe.precision, "attention": recipe.attention,
            "quantized_layers": sum(fmt is not None for fmt in recipe.layers.values()),
            "linear_layers": len(recipe.layers), "calibration": describe_calibration(recipe),
            "narrowed": recipe.narrowed,
            "svdquant": svdquant.branch_summary(k.stages["transformer"].module.model, rc.svd_layers(recipe),
                                                recipe.svd_rank, amax) if recipe.svd_rank else None}
    held_out = calib_data.drawn_pairs(req.report_size, calib_data.REPORT_SEED, small=not req.auto_resize)
    report = quality_report(k, quantized, held_out, req.calib_steps, req.auto_resize, info)
    write_report(req.out, report)
    del k, quantized
    if req.export:
        export_quantized(req.model, req.out, req.dtype)
    return report


def check_request(req: QuantizeRequest) -> tuple[object, str, list[calib_data.Pair]]:
    """Refuse a bad request in one line before anything is written: (checkpoint, attention format, pairs)."""
    from kontext_trt.core import checkpoint as ck
    ckpt = ck.open_checkpoint(req.model)
    attention = rc.check_precision(req.precision, req.attention, ckpt.family, family_named(ckpt.family).label)
    rc.check_svd(req.precision, req.svd_rank, req.svd_alpha)
    for name in ("calib_size", "calib_steps", "report_size"):
        if getattr(req, name) < 1:
            raise KontextError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(req, name)}")
    if req.dtype not in ("bf16", "fp32"):
        raise KontextError(f"--dtype {req.dtype!r}: use bf16 (TensorRT) or fp32 (ONNX Runtime)")
    resolve_device(req.device)
    pairs = calib_data.calibration_pairs(req.calib, req.calib_size, small=not req.auto_resize)
    check_out(req.out, ck.checkpoint_fingerprint(ckpt))
    return ckpt, attention, pairs


def recipe_for(transformer: torch.nn.Module, ckpt, req: QuantizeRequest, attention: str,
               pairs: list[calib_data.Pair]) -> rc.Recipe:
    """The recipe of this transformer, with the checkpoint and the calibration settings it is valid for."""
    from kontext_trt.core import checkpoint as ck
    recipe = rc.make_recipe(transformer, req.precision, attention,
                            rc.check_svd(req.precision, req.svd_rank, req.svd_alpha), req.svd_alpha, ckpt.family)
    recipe.checkpoint = {"path": str(Path(ckpt.root).resolve()), "fingerprint": ck.checkpoint_fingerprint(ckpt)}
    recipe.calibration = {"source": str(req.calib) if req.calib else "shipped drawn set", "size": len(pairs),
                          "steps": req.calib_steps, "auto_resize": req.auto_resize,
                          "pairs": [[p.source, p.prompt] for p in pairs]}
    return recipe


def ensure_calibration(k: Kontext, transformer: torch.nn.Module, recipe: rc.Recipe, pairs: list,
                       req: QuantizeRequest) -> bool:
    """Calibrate `transformer` (k's, instrumented in place) and save, unless req.out already holds this exact
    calibration; True when it was reused."""
    saved = state.load_state(req.out)
    if saved is not None and saved[0].to_dict() == recipe.to_dict():
        note(f"reusing the calibration in {req.out / state.FOLDER} (same checkpoint, recipe and calibration set)")
        return True
    state.save_state(req.out, recipe, calibrate(k, transformer, recipe, pairs, req.calib_steps, req.auto_resize))
    return False


def check_out(out: Path, fingerprint: str) -> None:
    """Refuse an output folder that holds an export or a calibration of another checkpoint."""
    manifest = read_export_manifest(out) if Path(out).is_dir() else None
    saved = state.load_state(out) if Path(out).is_dir() else None
    others = [m for m in (manifest.checkpoint if manifest else {}, saved[0].checkpoint if saved else {}) if m]
    for other in others:
        if other.get("fingerprint") != fingerprint:
            raise KontextError(f"{out} holds an export or calibration of another checkpoint ({other.get('path')}): "
                               "choose another --out")


def describe_calibration(recipe: rc.Recipe) -> str:
    """'8 edits of the shipped drawn set, 20 steps, auto-resize on'."""
    c = recipe.calibration
    return f"{c['size']} edits of {c['source']}, {c['steps']} steps, auto-resize {'on' if c['auto_resize'] else 'off'}"


def transformer_stage(model: torch.nn.Module, device: torch.device, ckpt) -> TorchStage:
    """A bf16 transformer stage of the torch backend, with the module and I/O names of the checkpoint's family."""
    return family_transformer_stage(model, device, REFERENCE, family_named(ckpt.family))


def flux1_aux_modules(ckpt, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """FLUX.1 Kontext's stages but the transformer: CLIP, T5 and the VAE's halves."""
    from kontext_trt.core import checkpoint as ck
    vae = ck.load_vae(ckpt, dtype)
    return {"clip": ClipModule(ck.load_clip(ckpt, dtype)), "t5": T5Module(ck.load_t5(ckpt, dtype)),
            "vae_encoder": VaeEncoderModule(vae), "vae_decoder": VaeDecoderModule(vae)}


def klein_aux_modules(ckpt, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """FLUX.2 [klein]'s stages but the transformer: the Qwen3 text encoder and the VAE's halves."""
    from kontext_trt.core import klein_checkpoint as kc
    vae = kc.load_klein_vae(ckpt, dtype)
    return {"text_encoder": load_qwen3_text(ckpt, dtype),
            "vae_encoder": KleinVaeEncoderModule(vae), "vae_decoder": KleinVaeDecoderModule(vae)}


AUX_MODULES = {FLUX1_KONTEXT.name: flux1_aux_modules, FLUX2_KLEIN.name: klein_aux_modules}


def reference_kontext(ckpt, device: torch.device, transformer: torch.nn.Module) -> Kontext:
    """The torch pipeline of the report over this bf16 transformer; the other stages in bf16 on CUDA, fp32 on the CPU
    (where bf16 convolutions are slow); they are shared by both sides of every comparison."""
    from kontext_trt.core import checkpoint as ck
    aux, family = torch.bfloat16 if device.type == "cuda" else torch.float32, family_named(ckpt.family)
    stages = {name: TorchStage(name, module.to(device), device, aux, io=family.io(name))
              for name, module in AUX_MODULES[family.name](ckpt, aux).items()}
    stages["transformer"] = transformer_stage(transformer, device, ckpt)
    info = PipelineInfo("torch", "bf16" if aux == torch.bfloat16 else "fp32", "bf16",
                        ck.checkpoint_fingerprint(ckpt)[:16], str(ckpt.root))
    return Kontext(stages, *ck.load_tokenizers(ckpt), KontextConfig.from_checkpoint(ckpt), device, info)
