"""The Python API (`from kontext_trt import KontextPipeline`) runs the very loop `kontext-trt edit` runs: same
latents bit for bit, on a checkpoint and on an export folder, one call and a multi-turn session."""
import pytest
import torch

from kontext_trt import KontextPipeline
from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, edit


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
    expected = edit(build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32")), req)
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


def test_outputs_are_checked_and_watermarked(pipe):
    from kontext_trt.safety import watermark

    out = pipe(prompt="a red house", num_inference_steps=1, height=256, width=256)
    assert out.metadata["safety"]["checker"] == "nudenet" and len(out.metadata["safety"]["outputs"]) == 1
    assert out.metadata["watermark"] is not None and watermark.read(out.images[0]).present


def test_flagged_output_raises_on_call_and_session_turn(pipe, fake_checkers):
    from kontext_trt.safety.checker import ContentFlagged, load_checker
    from kontext_trt.safety.guard import OutputPolicy

    strict = KontextPipeline(pipe.kontext, OutputPolicy(load_checker(f"{fake_checkers}:FlagOutputs"), "flag-outputs"))
    image = im.sample_image(64, 64, seed=4)
    with pytest.raises(ContentFlagged, match="output flagged by the safety checker \\(TEST_LABEL\\)") as caught:
        strict(prompt="add a hat", image=image, num_inference_steps=1, auto_resize=False)
    assert caught.value.verdicts[0].flagged and caught.value.passed == [None]
    strict.policy.checker.calls = 0  # the session's first turn: input passes, output flagged
    session = strict.session(image, num_inference_steps=1, auto_resize=False)
    with pytest.raises(ContentFlagged):
        session.edit("add a hat")
    assert session.image is image and session.history == []  # a withheld output never becomes the current image


def test_call_takes_a_step_cache(pipe):
    out = pipe(prompt="a red house", num_inference_steps=4, height=64, width=64, cache="teacache:1e9")
    assert out.metadata["cache"] == {"spec": "teacache:1e+09", "steps_computed": 2, "steps_skipped": 2}
