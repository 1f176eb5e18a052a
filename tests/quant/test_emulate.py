"""`kontext-trt eval --quantized DIR`: the fake-quantized transformer of a quantize folder (quant/emulate.py) run by
the torch pipeline, single and split (step caching), and its one-line refusals."""
from __future__ import annotations

import json

import torch

from kontext_trt.assemble import load_torch
from kontext_trt.cli.main import main
from kontext_trt.quant.emulate import with_emulated
from kontext_trt.quant.export import fused_transformer
from kontext_trt.quant.qmodel import QuantLinear, quantize_transformer
from kontext_trt.quant.state import load_state

QUICK = ["--n", "2", "--steps", "2", "--batch", "2", "--dtype", "fp32", "--device", "cpu"]


def test_emulated_transformer_is_the_quantized_model_of_the_saved_calibration(fp8_run, tiny_ckpt):
    from kontext_trt.core import checkpoint as ck
    out, _ = fp8_run
    k = load_torch(tiny_ckpt, "fp32", torch.device("cpu"))
    emulated = with_emulated(k, out)
    assert emulated.info.precision == "fp8 (emulated)" and k.info.precision == "fp32"
    model = emulated.stages["transformer"].module.model
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    for part in ("transformer_head", "transformer_body", "transformer_tail"):  # the step-cache parts share its modules
        assert emulated.stages[part].weights_of == "transformer"
        assert all(any(p is q for q in model.parameters()) for p in emulated.stages[part].module.parameters())
    recipe, amax = load_state(out)
    want = quantize_transformer(fused_transformer(ck.open_checkpoint(tiny_ckpt), torch.float32, []), recipe, amax,
                                torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_quantized_differs_from_full_precision_and_its_cache_off_split_is_the_same(fp8_run, tiny_ckpt,
                                                                                        tmp_path, capsys):
    out, _ = fp8_run
    assert main(["eval", "--model", str(tiny_ckpt), *QUICK, "--images", str(tmp_path / "fp32")]) == 0
    assert main(["eval", "--model", str(tiny_ckpt), *QUICK, "--quantized", str(out), "--images", str(tmp_path / "q"),
                 "--reference", str(tmp_path / "fp32"), "--json", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["pipeline"]["precision"] == "fp8 (emulated)"
    assert q["vs_reference"]["identical"] == 0 and q["vs_reference"]["psnr_db"]["mean"] < 99
    assert main(["eval", "--model", str(tiny_ckpt), *QUICK, "--quantized", str(out), "--cache", "fbcache:0",
                 "--reference", str(tmp_path / "q"), "--json", str(tmp_path / "split.json")]) == 0
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["cache"].startswith("fbcache") and split["vs_reference"]["identical"] == 2  # the parts: same model


def test_quantized_needs_the_torch_backend_and_a_calibration(fp8_run, tiny_ckpt, tmp_path, capsys):
    out, _ = fp8_run
    capsys.readouterr()
    assert main(["eval", "--backend", "onnxruntime", "--onnx", str(out), *QUICK, "--quantized", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--quantized emulates the quantized transformer on the torch backend" in err
    assert err.strip().count("\n") == 0
    assert main(["eval", "--model", str(tiny_ckpt), *QUICK, "--quantized", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no saved calibration" in err and err.strip().count("\n") == 0
