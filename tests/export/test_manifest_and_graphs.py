"""The export folder: manifest fields the engines and runtime read, clean TensorRT-ready graphs, copied tokenizers."""
import json
from collections import Counter

import onnx
import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from kontext_trt.core import checkpoint as ck
from kontext_trt.core.stages import STAGE_IO, STAGE_NAMES
from kontext_trt.export.onnx_file import float64_tensors
from kontext_trt.export.specs import BUCKET_TOKENS
from kontext_trt.runtime.flow import KontextConfig


@pytest.fixture(scope="module")
def manifest(tiny_onnx):
    return json.loads((tiny_onnx / "manifest.json").read_text())


def test_manifest_names_the_checkpoint_and_its_config(manifest, tiny_ckpt):
    ckpt = ck.open_checkpoint(tiny_ckpt)
    assert manifest["format_version"] == 1
    assert manifest["checkpoint"]["fingerprint"] == ck.checkpoint_fingerprint(ckpt)
    assert KontextConfig.from_dict(manifest["kontext"]) == KontextConfig.from_checkpoint(ckpt)
    assert set(manifest["tools"]) == {"torch", "onnx", "onnxslim", "diffusers", "transformers", "kontext-trt"}
    assert sorted(manifest["stages"]) == sorted(STAGE_NAMES)


def test_stage_entries(manifest, tiny_onnx):
    for name, entry in manifest["stages"].items():
        assert (tiny_onnx / entry["file"]).is_file() and not entry["external_data"]
        assert entry["dtype"] == entry["precision"] == "fp32" and entry["opset"] == 23 and entry["weight_bytes"] > 0
        assert tuple(v["name"] for v in entry["inputs"]) == STAGE_IO[name][0]
        assert tuple(v["name"] for v in entry["outputs"]) == STAGE_IO[name][1]
    tr = manifest["stages"]["transformer"]
    assert tr["dims"]["image_tokens"] == {"min": 16, "opt": 8192, "max": 2 * BUCKET_TOKENS, "multiple_of": 1}
    assert tr["dims"]["batch"] == {"min": 1, "opt": 1, "max": 4, "multiple_of": 1}
    hidden = tr["inputs"][0]
    assert hidden["shape"] == ["batch", "image_tokens", 64]
    assert hidden["profile"] == {"min": [1, 16, 64], "opt": [1, 8192, 64], "max": [4, 8300, 64]}
    assert tr["outputs"][0]["shape"] == ["batch", "image_tokens", 64]
    enc = manifest["stages"]["vae_encoder"]
    assert enc["inputs"][0]["profile"]["max"] == [4, 3, 2048, 2048]
    assert enc["outputs"][0]["shape"] == ["batch", 16, "height/8", "width/8"]
    dec = manifest["stages"]["vae_decoder"]
    assert dec["inputs"][0]["shape"] == ["batch", 16, "latent_height", "latent_width"]
    assert dec["outputs"][0]["shape"] == ["batch", 3, "8*latent_height", "8*latent_width"]
    assert manifest["stages"]["t5"]["inputs"][0]["shape"] == ["batch", 512]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_graph_is_checked_and_has_no_float64(tiny_onnx, stage):
    model = onnx.load(tiny_onnx / stage / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert float64_tensors(model.graph) == []
    assert [i.name for i in model.graph.input] == list(STAGE_IO[stage][0])


def test_transformer_attention_is_one_op_per_block(tiny_onnx):
    ops = Counter(n.op_type for n in onnx.load(tiny_onnx / "transformer" / "model.onnx").graph.node)
    assert ops["Attention"] == 4 and ops["Softmax"] == 0  # 2 double + 2 single blocks, each an IAttention


def test_tokenizers_are_copied(tiny_onnx, tiny_ckpt):
    clip, t5 = ck.load_tokenizers(ck.open_checkpoint(tiny_ckpt))
    text = "make the house blue"
    assert CLIPTokenizer.from_pretrained(tiny_onnx / "tokenizer")(text).input_ids == clip(text).input_ids
    assert T5TokenizerFast.from_pretrained(tiny_onnx / "tokenizer_2")(text).input_ids == t5(text).input_ids
