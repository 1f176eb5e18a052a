"""LoRA swaps by refit on a TensorRT transformer engine built with --refit (GPU only; skipped here with the reason)."""
import numpy as np
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import edit


@pytest.fixture(scope="module")
def refit_kontext(request, tmp_path_factory):
    """The tiny engines built for this GPU with --refit (GPU checked first, before any fixture is made)."""
    from kontext_trt.cli.main import main

    request.getfixturevalue("tensorrt_gpu")  # skips, saying why, without a GPU and the TensorRT that runs it
    tiny_onnx = request.getfixturevalue("tiny_onnx")
    root = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NVIDIA_TF32_OVERRIDE", "0")
        assert main(["build", "--onnx", str(tiny_onnx), "--out", str(root), "--sizes", "64x64", "--refit"]) == 0
    return build_pipeline(LoadSpec(None, backend="tensorrt", engines=root, precision="fp32", onnx=tiny_onnx))


@pytest.mark.cuda
def test_refit_swaps_match_onnxruntime_and_return_to_base(refit_kontext, request, lora_request):
    # session fixtures asked for here, after refit_kontext's GPU check (pytest makes them before module ones)
    k, tiny_onnx, tiny_loras = refit_kontext, request.getfixturevalue("tiny_onnx"), request.getfixturevalue("tiny_loras")
    lora_reference = request.getfixturevalue("lora_reference")
    base = edit(k, lora_request)
    k.set_loras([(tiny_loras["a"], 0.8)])
    with_a = edit(k, lora_request)
    assert np.abs(np.asarray(with_a.images[0], int) - lora_reference[0].astype(int)).max() <= 2
    ort = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx, loras=[(tiny_loras["a"], 0.8)]))
    assert (with_a.latents.cpu() - edit(ort, lora_request).latents).abs().max().item() < 1e-3
    k.set_loras([(tiny_loras["b"], 1.0)])
    k.set_loras([])
    assert torch.equal(edit(k, lora_request).latents, base.latents)
