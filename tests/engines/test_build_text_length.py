"""Engine profiles take the T5 text length from the export manifest's config: TensorRT-RTX builds (CPU, ahead of time)
of a 32-token export, of an export whose manifest predates text_length (512), and the refusal of a disagreement."""
import json
import shutil

import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.engines import build, cache
from kontext_trt.engines.profiles import Shapes
from kontext_trt.engines.skus import SKUS


def build_text_stages(onnx_dir, out, stages=("t5", "transformer")) -> cache.EngineManifest:
    folder, done = build.build_set(build.BuildRequest(
        onnx_dir=onnx_dir, out=out, sku=SKUS["rtx4090"], target=build.Target("tensorrt-rtx", (89,)),
        shapes=Shapes(((64, 64),), (1, 2)), stages=stages))
    assert done == list(stages)
    return cache.read_engine_manifest(folder)


def copy_without_text_length(onnx_dir, out, text_length=None):
    shutil.copytree(onnx_dir, out)
    data = json.loads((out / "manifest.json").read_text())
    data["kontext"].pop("text_length")
    if text_length is not None:
        data["kontext"]["text_length"] = text_length
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.mark.slow  # makes tiny_onnx_t32 (~20 s): early, so that its other users find it made instead of waiting
def test_a_32_token_export_builds_32_token_profiles(tiny_onnx_t32, tmp_path):
    manifest = build_text_stages(tiny_onnx_t32, tmp_path / "engines")
    t5, tr = manifest.stages["t5"], manifest.stages["transformer"]
    assert t5["profile"]["input_ids"] == {"min": [1, 32], "opt": [1, 32], "max": [2, 32]}
    assert t5["axes"]["S"] == [32, 32, 32] and tr["axes"]["S"] == [32, 32, 32]
    assert tr["profile"]["txt_ids"] == {"min": [32, 3], "opt": [32, 3], "max": [32, 3]}
    assert [shape[1] for shape in tr["profile"]["encoder_hidden_states"].values()] == [32, 32, 32]
    assert manifest.onnx["kontext"]["text_length"] == 32  # what the TensorRT backend's KontextConfig reads


def test_a_manifest_without_text_length_builds_512(tiny_onnx, tmp_path):
    old = copy_without_text_length(tiny_onnx, tmp_path / "onnx")
    assert "text_length" not in read_export_manifest(old).kontext
    assert build.text_length(read_export_manifest(old)) == 512 and build.text_length(None) is None
    manifest = build_text_stages(old, tmp_path / "engines", ("t5",))
    assert manifest.stages["t5"]["profile"]["input_ids"] == {"min": [1, 512], "opt": [1, 512], "max": [2, 512]}
    assert manifest.stages["t5"]["axes"]["S"] == [512, 512, 512]


def test_an_export_whose_graphs_disagree_with_its_manifest_is_refused(tiny_onnx_t32, tmp_path):
    wrong = copy_without_text_length(tiny_onnx_t32, tmp_path / "onnx", text_length=512)
    with pytest.raises(KontextError, match="32 T5 tokens in the ONNX but its export manifest says text_length 512"):
        build_text_stages(wrong, tmp_path / "engines", ("t5",))
