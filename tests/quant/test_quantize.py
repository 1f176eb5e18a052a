"""`kontext-trt quantize` on the tiny checkpoint: files, quality reports within bounds, calibration reuse, bad input.

Report bounds: measured on this CPU host with the fixtures' settings (the tiny checkpoint's random weights, 2
calibration edits of 2 steps from calib_jsonl, the 1-edit held-out report at 128x96 with 2 steps, bf16 reference;
repeated runs agree to the digits shown), then loosened by about 2x in error (~6 dB in PSNR):

| precision (attention) | worst step cosine | worst step rel. error | PSNR dB         | SSIM             |
|-----------------------|-------------------|-----------------------|-----------------|------------------|
| fp8 (fp8)             | 0.99905 >= 0.995  | 0.0435 <= 0.10        | 42.37 >= 36     | 0.9992 >= 0.995  |
| nvfp4 r0 (fp8)        | 0.99472 >= 0.98   | 0.1038 <= 0.20        | 35.03 >= 29     | 0.9957 >= 0.98   |
| nvfp4 r32 (fp8)       | 0.99867 >= 0.995  | 0.0516 <= 0.10        | 41.68 >= 36     | 0.9991 >= 0.995  |

(r: SVDQuant rank; r32 is the nvfp4 default. The tiny transformer is 64 wide, so rank 32 holds half of each weight.)
"""
import json

import pytest

from kontext_trt.cli.main import main
from kontext_trt.core.files import LOCK_NAME

BOUNDS = {"fp8_run": {"cosine_min": 0.995, "rel_error_max": 0.10, "psnr_min_db": 36.0, "ssim_min": 0.995},
          "nvfp4_plain_run": {"cosine_min": 0.98, "rel_error_max": 0.20, "psnr_min_db": 29.0, "ssim_min": 0.98},
          "nvfp4_run": {"cosine_min": 0.995, "rel_error_max": 0.10, "psnr_min_db": 36.0, "ssim_min": 0.995}}
RUNS = [("fp8_run", "fp8"), ("nvfp4_run", "nvfp4"), ("nvfp4_plain_run", "nvfp4")]


@pytest.mark.parametrize("run, precision", RUNS)
def test_quantize_writes_state_report_and_onnx(request, run, precision):
    out, printed = request.getfixturevalue(run)
    for name in ("quant/recipe.json", "quant/amax.safetensors", "report.json", "report.md", "transformer/model.onnx",
                 "manifest.json"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.rglob(".*") if p.name != LOCK_NAME]  # no temp files left (the lock file stays)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["stages"]["transformer"]
    assert entry["precision"] == precision and entry["dtype"] == ("fp32" if precision == "fp8" else "bf16")
    assert [i["name"] for i in entry["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                    "timestep", "img_ids", "txt_ids", "guidance"]
    recipe = json.loads((out / "quant/recipe.json").read_text())
    assert (recipe["precision"], recipe["attention"], len(recipe["calibration"]["pairs"])) == (precision, "fp8", 2)
    assert f"# Quantization report: {precision} (attention fp8) vs bf16" in printed and "| step | sigma |" in printed


@pytest.mark.parametrize("run, precision", RUNS)
def test_quality_report_is_within_bounds(request, run, precision):
    out, _ = request.getfixturevalue(run)
    report = json.loads((out / "report.json").read_text())
    s, bound = report["summary"], BOUNDS[run]
    assert s["cosine_min"] >= bound["cosine_min"] and s["rel_error_max"] <= bound["rel_error_max"], s
    assert s["psnr_min_db"] >= bound["psnr_min_db"] and s["ssim_min"] >= bound["ssim_min"], s
    assert [r["step"] for r in report["per_step"]] == [0, 1] and report["per_step"][0]["sigma"] == 1.0
    assert report["quantized_layers"] == 40 and report["linear_layers"] == 50


def test_fp8_is_closer_to_bf16_than_plain_nvfp4_and_svdquant_closes_the_gap(fp8_run, nvfp4_plain_run, nvfp4_run):
    fp8, fp4, svd = (json.loads((out / "report.json").read_text())["summary"]
                     for out, _ in (fp8_run, nvfp4_plain_run, nvfp4_run))
    assert fp8["cosine_min"] > fp4["cosine_min"] and fp8["psnr_mean_db"] > fp4["psnr_mean_db"]
    assert svd["cosine_min"] > fp4["cosine_min"] and svd["psnr_mean_db"] > fp4["psnr_mean_db"] + 3


def test_svdquant_report_and_state(nvfp4_run, nvfp4_plain_run):
    from safetensors.torch import load_file

    out, printed = nvfp4_run
    report, recipe = (json.loads((out / name).read_text()) for name in ("report.json", "quant/recipe.json"))
    svd = report["svdquant"]
    assert (recipe["svd_rank"], recipe["svd_alpha"], svd["rank"], svd["layers"]) == (32, None, 32, 34)
    # tiny: every NVFP4 layer is 64 wide in, and 64/128/192/256 out (or 320 wide in for the single blocks' proj_out)
    assert svd["branch_flop_per_token"] == 2 * svd["branch_params"] and svd["branch_params"] > 34 * 32 * 128
    assert 0 <= svd["alpha_min"] <= svd["alpha_mean"] <= svd["alpha_max"] <= 1
    amax = load_file(str(out / "quant/amax.safetensors"))
    assert amax["transformer_blocks.0.attn.to_q.smooth"].shape == (64,) and (amax[
        "transformer_blocks.0.attn.to_q.smooth"] > 0).all()
    assert "SVDQuant rank 32 on 34 NVFP4 layers" in printed
    plain = json.loads((nvfp4_plain_run[0] / "report.json").read_text())
    assert plain["svdquant"] is None and not any(k.endswith(".smooth") for k in
                                                 load_file(str(nvfp4_plain_run[0] / "quant/amax.safetensors")))


def test_same_request_reuses_the_calibration(fp8_run, tiny_ckpt, calib_jsonl, monkeypatch, capsys):
    from kontext_trt.core.checkpoint import load_transformer
    from kontext_trt.quant import quantize as qz

    out, _ = fp8_run
    req = qz.QuantizeRequest(model=tiny_ckpt, precision="fp8", out=out, calib=calib_jsonl, calib_size=2, calib_steps=2,
                             attention="fp8", report_size=1, dtype="fp32", auto_resize=False)
    ckpt, attention, pairs = qz.check_request(req)
    transformer = load_transformer(ckpt, qz.REFERENCE)
    k = qz.reference_kontext(ckpt, qz.resolve_device("cpu"), transformer)
    monkeypatch.setattr(qz, "calibrate", lambda *a: pytest.fail("calibrated again"))
    assert qz.ensure_calibration(k, transformer, qz.recipe_for(transformer, ckpt, req, attention, pairs), pairs, req)
    assert "reusing the calibration" in capsys.readouterr().err
    req.calib_steps = 3  # another calibration: it would be redone
    monkeypatch.setattr(qz, "calibrate", lambda *a: (_ for _ in ()).throw(RuntimeError("recalibrating")))
    with pytest.raises(RuntimeError, match="recalibrating"):
        qz.ensure_calibration(k, transformer, qz.recipe_for(transformer, ckpt, req, attention, pairs), pairs, req)


@pytest.mark.parametrize("case, message", [
    ("precision", "error: unknown precision 'int3': use fp8 or nvfp4"),
    ("empty", "error: no calibration data found in"),
    ("missing", "calibration image"),
    ("attention", "error: unknown attention precision 'fp16': use fp8 or bf16"),
    ("svd_fp8", "error: --svd-rank 16: SVDQuant is an nvfp4 recipe; drop --svd-rank for fp8"),
    ("svd_negative", "error: --svd-rank must be 0 (plain NVFP4) or more, got -1"),
    ("svd_alpha", "error: --svd-alpha must lie in [0, 1]"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_ckpt, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "gone.png", "prompt": "Add a hat."}) + "\n")
    args = {"precision": ["--precision", "int3"], "empty": ["--precision", "nvfp4", "--calib", str(tmp_path / "empty")],
            "missing": ["--precision", "fp8", "--calib", str(tmp_path / "pairs.jsonl")],
            "attention": ["--precision", "fp8", "--attention", "fp16"],
            "svd_fp8": ["--precision", "fp8", "--svd-rank", "16"],
            "svd_negative": ["--precision", "nvfp4", "--svd-rank", "-1"],
            "svd_alpha": ["--precision", "nvfp4", "--svd-alpha", "1.5"]}[case]
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tiny_ckpt), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_quantize_export_needs_a_saved_calibration(tmp_path, tiny_ckpt, capsys):
    assert main(["quantize-export", "--model", str(tiny_ckpt), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no calibration in {tmp_path}: run `kontext-trt quantize --out " \
                                              f"{tmp_path}` first"
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # its own fp8 calibration: ~15 s
def test_lora_is_fused_before_calibrating(tmp_path, tiny_ckpt, calib_jsonl, fp8_run, capsys):
    """quantize --lora: the LoRA goes into the weights first, so calibration and the Q/DQ ONNX see the fused model."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=gen),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=gen)}, lora)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_ckpt), "--out", str(out), "--calib", str(calib_jsonl),
                 "--calib-size", "2", "--calib-steps", "2", "--report-size", "1", "--no-auto-resize",
                 "--precision", "fp8", "--attention", "fp8", "--dtype", "fp32", "--lora", f"{lora}:0.5"]) == 0
    recipe = json.loads((out / "quant/recipe.json").read_text())
    entry = json.loads((out / "manifest.json").read_text())["stages"]["transformer"]
    assert recipe["loras"] == [[str(lora.resolve()), 0.5]]
    assert entry["loras"] == [{"file": "style.safetensors", "scale": 0.5}] and entry["precision"] == "fp8"
    plain = fp8_run[0]
    assert (out / "quant/amax.safetensors").read_bytes() != (plain / "quant/amax.safetensors").read_bytes()
    assert (out / "transformer/model.onnx").read_bytes() != (plain / "transformer/model.onnx").read_bytes()


@pytest.mark.slow  # its own checkpoint and nvfp4 calibration: ~16 s
def test_layers_whose_width_is_not_a_multiple_of_16_stay_in_fp8(tmp_path_factory, quantize_run):
    """A transformer 24 wide (2 heads of 12): NVFP4 needs whole 16-element blocks of the input, so every layer that
    reads the 24-wide stream (or the single blocks' 24 + 96 = 120-wide concat) runs in FP8, listed in the report."""
    from kontext_trt.synth import write_synthetic_checkpoint

    ckpt = write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "w24", transformer={
        "attention_head_dim": 12, "axes_dims_rope": [4, 4, 4]})
    out, printed = quantize_run(ckpt, "w24", "--precision", "nvfp4", "--calib-size", "1")
    recipe, report = (json.loads((out / name).read_text()) for name in ("quant/recipe.json", "report.json"))
    narrowed = set(recipe["narrowed"])
    assert "transformer_blocks.0.attn.to_q" in narrowed and "single_transformer_blocks.1.proj_out" in narrowed
    assert all(recipe["layers"][n] == "fp8" for n in narrowed) and report["narrowed"] == recipe["narrowed"]
    assert recipe["narrowed"]["single_transformer_blocks.0.proj_out"] == \
        "nvfp4 -> fp8: input width 120 is not a multiple of nvfp4's 16-element block"
    nvfp4 = {n for n, f in recipe["layers"].items() if f == "nvfp4"}
    assert nvfp4 == {f"transformer_blocks.{i}.{ff}.net.2" for i in (0, 1) for ff in ("ff", "ff_context")}  # 96 in
    assert report["svdquant"]["layers"] == 4 and "| single_transformer_blocks.1.proj_out | nvfp4 -> fp8" in printed
    assert (out / "transformer/model.onnx").is_file()
