"""`kontext-trt quantize` of a FLUX.2 [klein] transformer on this CPU host: FP8 with FP8 attention (ModelOpt max
calibration over klein edits, the family's exclusions, Q/DQ ONNX in opset-19+ FLOAT8E4M3FN that ONNX Runtime runs),
NVFP4 (the same emulated path and report as FLUX.1's), and the FP8 attention processors of klein's double and single
blocks against diffusers' own."""
import contextlib
import io
import json
from collections import Counter

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
    assert quantize(klein_distilled, out, calib, "--precision", "fp8", "--attention", "fp8", "--dtype", "fp32") == 0
    return out


def test_fp8_recipe_keeps_the_family_exclusions(fp8):
    recipe = Recipe.from_dict(json.loads((fp8 / "quant" / "recipe.json").read_text()))
    assert (recipe.precision, recipe.attention, recipe.attention_layers) == ("fp8", "fp8", [
        "transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
    amax = load_file(str(fp8 / "quant" / "amax.safetensors"))
    assert all(amax[f"{name}.{q}"] > 0 for name in recipe.attention_layers for q in "qkv")
    layers = recipe.layers
    for kept in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                 "time_guidance_embed.timestep_embedder.linear_1"):
        assert layers[kept] is None, kept
    assert layers["double_stream_modulation_img.linear"] == "fp8"
    assert layers["transformer_blocks.0.attn.to_q"] == layers["single_transformer_blocks.1.attn.to_qkv_mlp_proj"] \
        == "fp8"
    report = json.loads((fp8 / "report.json").read_text())
    # fp8 and fp8 attention vs bf16, one klein edit of 2 steps (measured: 0.981, 0.193, 25.4 dB; linears alone:
    # 0.984, 0.180, 26.3 dB)
    summary = report["summary"]
    assert summary["cosine_min"] >= 0.98 and summary["rel_error_max"] <= 0.2 and summary["psnr_min_db"] >= 25, summary


def test_fp8_qdq_onnx_runs_in_onnxruntime_within_bound_of_fp32(fp8, klein_distilled):
    model = onnx.load(str(fp8 / "transformer" / "model.onnx"))
    assert graph_precision(model) == "fp8" and {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in
                                                                                         model.graph.node}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    ops_used = Counter(n.op_type for n in model.graph.node)  # each block's attention: Q/DQ MatMul-Softmax-MatMul
    assert ops_used["Softmax"] == 3 and "Attention" not in ops_used
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
    assert recipe["attention"] == "fp8" and recipe["layers"]["transformer_blocks.0.ff.linear_in"] == "nvfp4"
    assert len(recipe["attention_layers"]) == 3  # FP8 attention: nvfp4's default, as FLUX.1's
    assert recipe["layers"]["single_stream_modulation.linear"] == "fp8"  # AdaLN capped at fp8, as FLUX.1's
    summary = json.loads((out / "report.json").read_text())["summary"]  # measured: 0.898, 0.464, 20.5 dB
    assert summary["cosine_min"] >= 0.85 and summary["psnr_min_db"] >= 18, summary
    fp8_summary = json.loads((fp8 / "report.json").read_text())["summary"]
    assert summary["cosine_min"] < fp8_summary["cosine_min"] and summary["psnr_min_db"] < fp8_summary["psnr_min_db"]
    model = onnx.load(str(out / "transformer" / "model.onnx"), load_external_data=False)
    assert {"TRT_FP4DynamicQuantize"} <= {n.op_type for n in model.graph.node}


def test_fp8_attention_processors_are_diffusers_flux2_ones_around_the_fp8_matmuls(klein_distilled, monkeypatch):
    """The FP8 processors of klein's double (Flux2Attention) and single (Flux2ParallelSelfAttention) blocks: with the
    Q/DQ made an identity they are diffusers' processors to float32 rounding; with it, FP8's error and no more."""
    from kontext_trt.quant import ops
    from kontext_trt.quant.recipe import make_recipe

    ckpt = ck.open_checkpoint(klein_distilled)
    inputs = transformer_case(2, [(4, 4), (2, 6)], 24, 3)
    with torch.inference_mode():
        ref = kc.load_klein_transformer(ckpt, torch.float32)(**inputs, return_dict=False)[0]
        recipe = make_recipe(kc.load_klein_transformer(ckpt, torch.float32), "fp8", "fp8", family="flux2-klein")
        assert recipe.attention_layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                           "single_transformer_blocks.1.attn"]
        recipe.layers = dict.fromkeys(recipe.layers)  # attention alone
        amax = {f"{name}.{q}": torch.tensor(12.0) for name in recipe.attention_layers for q in "qkv"}
        model = quantize_transformer(kc.load_klein_transformer(ckpt, torch.float32), recipe, amax, torch.float32)
        assert {type(m.processor).__name__ for m in model.modules() if hasattr(m, "p_scale")} == {
            "Fp8Flux2AttnProcessor", "Fp8Flux2ParallelAttnProcessor"}
        fp8 = model(**inputs, return_dict=False)[0]
        monkeypatch.setattr(ops, "fp8_qdq", lambda x, scale: x)
        exact = model(**inputs, return_dict=False)[0]
    assert (exact - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # FP8 at amax 12 (the q, k, v ranges here reach 8..12): measured 0.145 relative L2, what fp8_attention gives on
    # such sharp softmaxes alone (0.12..0.14 on random q, k, v; FLUX.1's processor runs the same function)
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    assert 0.01 < rel <= 0.2, rel


def test_fp8_attention_parses_and_builds_with_tensorrt_rtx(fp8, tmp_path):
    """TensorRT-RTX keeps the Q/DQ of klein's FP8 attention: per block, q, k, v and the probabilities quantized and both
    attention matmuls fed by FP8 activations on both sides, beside the 19 FP8 linears; the FP8 plan builds for sm89."""
    from kontext_trt.engines import trt_api

    pytest.importorskip("tensorrt_rtx")
    net = trt_api.parse_onnx(trt_api.load_api("tensorrt-rtx"), fp8 / "transformer" / "model.onnx").network
    layers = [net.get_layer(i) for i in range(net.num_layers)]
    producer = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    kinds = Counter(layer.type.name for layer in layers)
    assert (kinds["QUANTIZE"], kinds["DEQUANTIZE"]) == (13 + 3 * 4, 13 + 19 + 3 * 4)  # linears' inputs and weights

    def quantized_activation(layer, j: int) -> bool:  # input j dequantizes what a QUANTIZE layer made at run time
        dq = producer.get(layer.get_input(j).name)
        q = dq is not None and dq.type.name == "DEQUANTIZE" and producer.get(dq.get_input(0).name)
        return bool(q) and q.type.name == "QUANTIZE"

    attention = [layer for layer in layers if layer.type.name == "MATRIX_MULTIPLY" and
                 quantized_activation(layer, 0) and quantized_activation(layer, 1)]
    assert len(attention) == 3 * 2  # q k^T and p v of each block (a linear's other side is a constant weight)
    engines = tmp_path / "engines"
    assert main(["build", "--onnx", str(fp8), "--out", str(engines), "--sku", "rtx4090", "--precision", "fp8",
                 "--static", "128x128"]) == 0
    plans = list(engines.glob("*/*/fp8/transformer.plan"))
    assert len(plans) == 1 and trt_api.rtx_header(plans[0].read_bytes())[1] == (89,)
