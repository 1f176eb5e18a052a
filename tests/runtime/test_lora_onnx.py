"""LoRAs on exported ONNX: the manifest's weight map, onnxruntime swaps without re-export (against diffusers), and
export --lora (tiny checkpoint, fp32)."""
import json
import shutil

import numpy as np
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import checkpoint as ck
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.core.weight_map import OnnxWeights
from kontext_trt.runtime.flow import edit
from kontext_trt.runtime.lora import fused_weights, read_lora


def manifest_entry(folder):
    return json.loads((folder / "manifest.json").read_text())["stages"]["transformer"]


def test_weight_map_reads_back_every_parameter(tiny_ckpt, tiny_onnx):
    entry = manifest_entry(tiny_onnx)
    params = dict(ck.load_transformer(ck.open_checkpoint(tiny_ckpt), torch.float32).named_parameters())
    weights = OnnxWeights(tiny_onnx / entry["file"], entry["weights"])
    assert set(entry["weights"]) == {n for n, p in params.items() if p.ndim in (1, 2)}
    assert sum(w["transpose"] for w in entry["weights"].values()) > 20  # linear weights folded into MatMul (in, out)
    for name in entry["weights"]:
        assert torch.equal(weights.read(name), params[name]), name
        init, value = weights.onnx_value(name, params[name])
        assert init == entry["weights"][name]["name"] and torch.equal(value, weights.read(name).T.contiguous()
                                                                      if entry["weights"][name]["transpose"]
                                                                      else weights.read(name))


def test_onnxruntime_swaps_without_reexport(lora_request, tiny_onnx, tiny_loras, lora_reference):
    files = {p: p.stat().st_mtime_ns for p in tiny_onnx.rglob("*") if p.is_file()}
    k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx))
    base = edit(k, lora_request)
    k.set_loras([(tiny_loras["a"], 0.8)])
    with_a = edit(k, lora_request)
    reference = lora_reference
    assert np.abs(np.asarray(with_a.images[0], int) - reference[0].astype(int)).max() <= 2
    assert np.abs(np.asarray(base.images[0], int) - reference[0].astype(int)).max() > 20
    k.set_loras([(tiny_loras["b"], 1.0)])
    k.set_loras([])
    again = edit(k, lora_request)
    assert torch.equal(again.latents, base.latents) and not k.stages["transformer"].overrides
    assert files == {p: p.stat().st_mtime_ns for p in tiny_onnx.rglob("*") if p.is_file()}


@pytest.mark.slow  # a transformer export: ~12 s
def test_export_lora_bakes_the_fused_weights(tiny_onnx, tiny_ckpt, tiny_loras, tmp_path):
    out = tmp_path / "baked"
    shutil.copytree(tiny_onnx, out)
    code = main(["export", "--model", str(tiny_ckpt), "--out", str(out), "--stages", "transformer", "--dtype", "fp32",
                 "--lora", f"{tiny_loras['a']}:0.8"])
    assert code == 0
    entry = manifest_entry(out)
    assert entry["loras"] == [{"file": "pytorch_lora_weights.safetensors", "scale": 0.8}]
    baked, base = OnnxWeights(out / entry["file"], entry["weights"]), OnnxWeights(tiny_onnx / entry["file"],
                                                                                  manifest_entry(tiny_onnx)["weights"])
    fused = dict(fused_weights([read_lora(tiny_loras["a"], 0.8)], base.read))
    assert len(fused) == 26  # 12 linear layers in each of the 2 double blocks, proj_out in the 2 single ones
    for name, value in fused.items():
        assert torch.equal(baked.read(name), value), name
    k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=out))
    with pytest.raises(KontextError, match="exported with LoRAs fused in"):
        k.set_loras([(tiny_loras["b"], 1.0)])
