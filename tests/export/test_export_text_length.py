"""An export takes the T5 text length of the checkpoint it exports: a 32-token checkpoint's ONNX reads 32 tokens, in
its manifest, its graphs and an ONNX Runtime edit."""
import json

import numpy as np
import onnx
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.export.specs import sample_inputs
from kontext_trt.runtime.flow import EditRequest, KontextConfig, edit
from kontext_trt.runtime.ort_stages import OrtStage


class Spy:
    """A stage that records the shape of every input it is called with, then runs the stage it wraps."""

    def __init__(self, stage) -> None:
        self.stage, self.seen = stage, []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append({name: tuple(t.shape) for name, t in inputs.items()})
        return self.stage(**inputs)


def inputs_of(manifest: dict, stage: str) -> dict[str, list]:
    return {v["name"]: v["shape"] for v in manifest["stages"][stage]["inputs"]}


def test_manifest_and_graphs_read_32_tokens(tiny_onnx_t32, tiny_ckpt_t32):
    manifest = json.loads((tiny_onnx_t32 / "manifest.json").read_text())
    assert manifest["kontext"]["text_length"] == 32
    ckpt = ck.open_checkpoint(tiny_ckpt_t32)
    assert KontextConfig.from_dict(manifest["kontext"]) == KontextConfig.from_checkpoint(ckpt)
    dt = ckpt.transformer_config["joint_attention_dim"]
    assert inputs_of(manifest, "t5") == {"input_ids": ["batch", 32]}
    tr = inputs_of(manifest, "transformer")
    assert tr["encoder_hidden_states"] == ["batch", 32, dt] and tr["txt_ids"] == [32, 3]
    model = onnx.load(tiny_onnx_t32 / "t5" / "model.onnx", load_external_data=False)
    (ids,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim] == ["batch", 32]


def test_sample_inputs_follow_the_text_length(tiny_ckpt_t32):
    config = ck.open_checkpoint(tiny_ckpt_t32).transformer_config
    assert sample_inputs("t5", config, torch.float32, 32)["input_ids"].shape == (2, 32)
    tr = sample_inputs("transformer", config, torch.float32, 32)
    assert tr["encoder_hidden_states"].shape[1] == 32 and tr["txt_ids"].shape == (32, 3)
    body = sample_inputs("transformer_body", config, torch.float32, 7)
    assert body["block_encoder_hidden_states"].shape[1] == 7 and body["txt_ids"].shape == (7, 3)


def test_onnxruntime_edit_feeds_32_tokens_and_matches_torch(tiny_onnx_t32, tiny_ckpt_t32):
    ort_k = build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=tiny_onnx_t32))
    assert ort_k.config.text_length == 32
    t5, transformer = Spy(ort_k.stages["t5"]), Spy(ort_k.stages["transformer"])
    req = EditRequest(prompts=["turn the house red"], image=im.sample_image(80, 64, seed=3), width=64, height=64,
                      steps=2, seed=11, auto_resize=False)
    ours = edit(ort_k.with_stages(t5=t5, transformer=transformer), req)
    assert t5.seen == [{"input_ids": (1, 32)}]
    assert {s["txt_ids"] for s in transformer.seen} == {(32, 3)} and len(transformer.seen) == 2
    ref = edit(build_pipeline(LoadSpec(tiny_ckpt_t32, backend="torch", dtype="fp32")), req)
    assert (ours.latents - ref.latents).abs().max().item() < 1e-4
    for a, b in zip(ours.images, ref.images):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def test_the_t5_graph_takes_32_tokens_only(tiny_onnx_t32):
    t5 = OrtStage("t5", tiny_onnx_t32 / "t5" / "model.onnx")
    assert t5(input_ids=torch.zeros(2, 32, dtype=torch.int64))["text_embeddings"].shape[:2] == (2, 32)
    with pytest.raises(Exception, match="index: 1 Got: 512 Expected: 32"):  # onnxruntime's: static in the graph
        t5(input_ids=torch.zeros(1, 512, dtype=torch.int64))
