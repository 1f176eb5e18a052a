"""`kontext-trt quantize` of a FLUX.2 [klein] transformer on this CPU host: FP8 (ModelOpt max calibration over klein
edits, the family's exclusions, Q/DQ ONNX in opset-19+ FLOAT8E4M3FN that ONNX Runtime runs) and NVFP4 (the same
emulated path and report as FLUX.1's), and the refusal of FP8 attention, which only FLUX.1's attention has."""
import contextlib
import io
import json

import onnx
import pytest
import torch
from safetensors.torch import load_file
from tiny_klein import transformer_case

from kontext_trt.cli.main import main
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import klein_checkpoint as kc
from kontext_trt.core.image import sample_image
from kontext_trt.core.onnx_dir import graph_precision
from kontext_trt.quant.qmodel import QuantLinear, quantize_transformer
from kontext_trt.quant.recipe import Recipe
from kontext_trt.runtime.ort_stages import OrtStage

QUICK = ["--calib-size", "2", "--calib-steps", "2", "--report-size", "1", "--no-auto-resize"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("klein-calib")
    lines = []
    for i, ((w, h), prompt) in enumerate((((64, 80), "add snow on the roof"), ((96, 64), "make it night"))):
        sample_image(w, h, seed=60 + i).save(folder / f"scene{i}.png")
        lines.append(json.dumps({"image": f"scene{i}.png", "prompt": prompt}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def quantize(ckpt, out, calib, *args) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["quantize", "--model", str(ckpt), "--out", str(out), "--calib", str(calib), *QUICK, *args])


@pytest.fixture(scope="module")
def fp8(klein_distilled, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("klein-fp8") / "q"
    assert quantize(klein_distilled, out, calib, "--precision", "fp8", "--dtype", "fp32") == 0
    return out


def test_fp8_recipe_keeps_the_family_exclusions(fp8):
    recipe = Recipe.from_dict(json.loads((fp8 / "quant" / "recipe.json").read_text()))
    assert (recipe.precision, recipe.attention, recipe.attention_layers) == ("fp8", "bf16", [])
    layers = recipe.layers
    for kept in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                 "time_guidance_embed.timestep_embedder.linear_1"):
        assert layers[kept] is None, kept
    assert layers["double_stream_modulation_img.linear"] == "fp8"
    assert layers["transformer_blocks.0.attn.to_q"] == layers["single_transformer_blocks.1.attn.to_qkv_mlp_proj"] \
        == "fp8"
    report = json.loads((fp8 / "report.json").read_text())
    summary = report["summary"]  # fp8 vs bf16, one klein edit of 2 steps (measured: 0.984, 0.180, 26.3 dB)
    assert summary["cosine_min"] >= 0.98 and summary["rel_error_max"] <= 0.2 and summary["psnr_min_db"] >= 25, summary


def test_fp8_qdq_onnx_runs_in_onnxruntime_within_bound_of_fp32(fp8, klein_distilled):
    model = onnx.load(str(fp8 / "transformer" / "model.onnx"))
    assert graph_precision(model) == "fp8" and {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in
                                                                                         model.graph.node}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    manifest = json.loads((fp8 / "manifest.json").read_text())
    assert manifest["kontext"]["family"] == "flux2-klein" and manifest["stages"]["transformer"]["precision"] == "fp8"
    stage = OrtStage("transformer", fp8 / "transformer" / "model.onnx", io=(
        ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"), ("latent",)))
    inputs = transformer_case(1, [(4, 4), (4, 6)], 512, 11)
    got = stage(**inputs)["latent"]
    ckpt = ck.open_checkpoint(klein_distilled)
    recipe = Recipe.from_dict(json.loads((fp8 / "quant" / "recipe.json").read_text()))
    amax = load_file(str(fp8 / "quant" / "amax.safetensors"))
    args = [inputs[n] for n in ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")]
    with torch.inference_mode():
        full = kc.load_klein_transformer(ckpt, torch.float32)
        ref = full(*args, return_dict=False)[0]
        emulated = quantize_transformer(kc.load_klein_transformer(ckpt, torch.float32), recipe, amax, torch.float32)
        assert any(isinstance(m, QuantLinear) for m in emulated.modules())
        fake = emulated(*args, return_dict=False)[0]
    # ORT runs the Q/DQ graph as the emulation does (FLUX.1's bound: RoPE in fp32 vs float64 flips a few roundings)
    assert ((got - fake).norm() / fake.norm()).item() <= 0.02
    # FP8 against fp32 on these random inputs, partly outside the ranges the two calibration edits saw (the tiny
    # transformer's weights are scaled x3): measured 0.37 relative L2; on real edit steps the report's bound holds
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0.01 < rel <= 0.5


def test_nvfp4_quantizes_like_flux1(klein_distilled, calib, fp8, tmp_path):
    out = tmp_path / "q4"
    assert quantize(klein_distilled, out, calib, "--precision", "nvfp4", "--svd-rank", "0") == 0
    recipe = json.loads((out / "quant" / "recipe.json").read_text())
    assert recipe["attention"] == "bf16" and recipe["layers"]["transformer_blocks.0.ff.linear_in"] == "nvfp4"
    assert recipe["layers"]["single_stream_modulation.linear"] == "fp8"  # AdaLN capped at fp8, as FLUX.1's
    summary = json.loads((out / "report.json").read_text())["summary"]  # measured: 0.898, 0.464, 20.5 dB
    assert summary["cosine_min"] >= 0.85 and summary["psnr_min_db"] >= 18, summary
    fp8_summary = json.loads((fp8 / "report.json").read_text())["summary"]
    assert summary["cosine_min"] < fp8_summary["cosine_min"] and summary["psnr_min_db"] < fp8_summary["psnr_min_db"]
    model = onnx.load(str(out / "transformer" / "model.onnx"), load_external_data=False)
    assert {"TRT_FP4DynamicQuantize"} <= {n.op_type for n in model.graph.node}


def test_fp8_attention_is_refused_for_klein_in_one_line(klein_distilled, calib, tmp_path, capsys):
    code = quantize(klein_distilled, tmp_path / "q", calib, "--precision", "nvfp4", "--attention", "fp8")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "q").exists()
    assert "--attention fp8: FP8 attention is FLUX.1 Kontext's (FluxAttention); a FLUX.2 [klein] transformer" in err
