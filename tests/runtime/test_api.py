"""The Python API (`from kontext_trt import KontextPipeline`) runs the very loop `kontext-trt edit` runs: same
latents bit for bit, on a checkpoint and on an export folder, one call and a multi-turn session."""
import pytest
import torch

from kontext_trt import KontextPipeline
from kontext_trt.runtime import image as im
from kontext_trt.runtime.errors import KontextError
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.pipeline import load_kontext


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return KontextPipeline.load(tiny_ckpt, dtype="fp32", device="cpu")


def test_call_is_the_edit_path_bit_for_bit(pipe, tiny_ckpt, tmp_path):
    source = tmp_path / "in.png"
    im.sample_image(80, 64, seed=2).save(source)
    out = pipe(prompt="add a hat", image=str(source), num_inference_steps=2, guidance_scale=3.0, generator_seed=5,
               auto_resize=False)
    req = EditRequest(prompts=["add a hat"], image=im.load_image(source), steps=2, guidance=3.0, seed=5,
                      auto_resize=False)
    expected = edit(load_kontext(tiny_ckpt, dtype="fp32"), req)
    assert torch.equal(out.latents, expected.latents)
    assert len(out.images) == 1 and out.images[0].size == (80, 64) and out.metadata["seed"] == 5
    assert pipe.info.backend == "torch" and pipe.info.dtype == "fp32"


def test_text_to_image_size_and_batch(pipe):
    out = pipe(prompt=["a red house", "a blue house"], num_inference_steps=1, height=64, width=96)
    assert [img.size for img in out.images] == [(96, 64), (96, 64)]


def test_session_turns_match_separate_calls(pipe):
    image = im.sample_image(64, 64, seed=4)
    session = pipe.session(image, num_inference_steps=2, generator_seed=1, auto_resize=False)
    first = session.edit("add a hat")
    second = session.edit("make it night")
    direct = pipe(prompt="add a hat", image=image, num_inference_steps=2, generator_seed=1, auto_resize=False)
    assert torch.equal(first.latents, direct.latents)
    again = pipe(prompt="make it night", image=first.images[0], num_inference_steps=2, generator_seed=1,
                 auto_resize=False)
    assert torch.equal(second.latents, again.latents) and session.image is second.images[0]


def test_onnx_folder_loads_on_onnxruntime(tiny_onnx):
    onnx_pipe = KontextPipeline.load(onnx=tiny_onnx, device="cpu")
    assert onnx_pipe.info.backend == "onnxruntime"
    assert onnx_pipe(prompt="add a hat", image=im.sample_image(64, 64), num_inference_steps=1,
                     auto_resize=False).images[0].size == (64, 64)


def test_bad_call_is_one_line(pipe):
    with pytest.raises(KontextError, match="steps must be at least 1"):
        pipe(prompt="x", num_inference_steps=0)
    with pytest.raises(KontextError, match="give both --width and --height"):
        pipe(prompt="x", width=64)
