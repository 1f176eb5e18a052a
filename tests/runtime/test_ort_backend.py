"""The onnxruntime backend runs the same flow loop as torch and gives the same edits (tiny checkpoint, fp32)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.ort_stages import OrtStage


@pytest.fixture(scope="module")
def torch_k(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32"))


@pytest.fixture(scope="module")
def ort_k(tiny_onnx):
    return build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx))


@pytest.mark.parametrize("prompts,width,height", [(["turn the house red"], 64, 64),
                                                   (["add a cat", "make it night"], 96, 64)])
def test_edit_matches_torch_backend(torch_k, ort_k, prompts, width, height):
    req = EditRequest(prompts=prompts, image=im.sample_image(80, 64, seed=3), width=width, height=height, steps=2,
                      seed=11, auto_resize=False)
    ours, ref = edit(ort_k, req), edit(torch_k, req)
    assert ours.latents.shape == ref.latents.shape
    assert (ours.latents - ref.latents).abs().max().item() < 1e-4
    for a, b in zip(ours.images, ref.images):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    assert ours.metadata["backend"] == "onnxruntime" and ours.metadata["checkpoint"] == ref.metadata["checkpoint"]


def test_stage_adapter_casts_and_names(tiny_onnx):
    stage = OrtStage("vae_decoder", tiny_onnx / "vae_decoder" / "model.onnx")
    out = stage(latent=torch.randn(1, 16, 8, 12, dtype=torch.float64))
    assert list(out) == ["images"] and out["images"].dtype == torch.float32 and out["images"].shape == (1, 3, 64, 96)
    assert stage.graph_refusal() is None
    stage.device = torch.device("cuda")  # a CUDA run host-syncs: the graph wrapper must run it eagerly, not capture
    assert "onnxruntime synchronises with the host" in stage.graph_refusal()


def test_cli_edit_with_onnx_folder_alone(capsys, tiny_onnx, tmp_path):
    out = tmp_path / "out.png"
    code = main(["edit", "--backend", "onnxruntime", "--onnx", str(tiny_onnx), "--prompt", "a red door",
                 "--out", str(out), "--steps", "1", "--width", "64", "--height", "64"])
    assert code == 0 and json.loads(Image.open(out).text["kontext-trt"])["backend"] == "onnxruntime"


@pytest.mark.parametrize("argv,message", [
    ([], "--backend onnxruntime needs --onnx DIR"),
    (["--onnx", "{tmp}/nothing"], "no manifest.json"),
    (["--onnx", "{partial}"], "stage transformer was not exported"),
])
def test_cli_errors(capsys, tiny_onnx, tmp_path, argv, message):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_onnx, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["stages"]["transformer"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    argv = [a.format(tmp=tmp_path, partial=partial) for a in argv]
    code = main(["edit", "--backend", "onnxruntime", *argv, "--prompt", "x", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_load_kontext_refuses_missing_folder(tmp_path):
    with pytest.raises(KontextError, match="no manifest.json"):
        build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tmp_path))
