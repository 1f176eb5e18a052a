"""Same seed, same references: our loop against diffusers' Flux2KleinPipeline on tiny klein checkpoints in fp32, with
1, 2 and 4 references, swapped order, references of different sizes, text alone, distilled (no CFG) and base (true
CFG against the empty prompt)."""
from dataclasses import replace

import numpy as np
import pytest
import tiny_klein
import torch
from diffusers import Flux2KleinPipeline

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime import klein
from kontext_trt.runtime.flow import edit, request

REFS = [im.sample_image(64, 64, seed=1), im.sample_image(96, 64, seed=2), im.sample_image(80, 112, seed=3),
        im.sample_image(128, 72, seed=4)]


def load_pair(ckpt):
    pipe = Flux2KleinPipeline.from_pretrained(ckpt, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, build_pipeline(LoadSpec(ckpt, backend="torch", dtype="fp32"))


@pytest.fixture(scope="module")
def distilled(klein_distilled):
    return load_pair(klein_distilled)


@pytest.fixture(scope="module")
def base(klein_base):
    return load_pair(klein_base)


def assert_parity(pair, req) -> np.ndarray:
    return tiny_klein.assert_parity(pair, req, levels=1)  # torch fp32: within one uint8 level


@pytest.mark.parametrize("count", [1, 2, 4])
def test_references_match_diffusers(distilled, count):
    got = assert_parity(distilled, request(["turn the house red"], REFS[:count], steps=2, seed=7))
    assert got.shape[1:3] == (64, 64)  # the first reference's size


def test_swapped_order_matches_diffusers_and_matters(distilled):
    forward = assert_parity(distilled, request(["a cat on the roof"], REFS[:2], steps=2, seed=3, width=64, height=64))
    swapped = assert_parity(distilled, request(["a cat on the roof"], REFS[1::-1], steps=2, seed=3, width=64,
                                               height=64))
    assert np.abs(forward.astype(int) - swapped.astype(int)).max() > 8


def test_references_of_other_sizes_and_output_size_match_diffusers(distilled):
    got = assert_parity(distilled, request(["add snow"], [REFS[2], REFS[3], REFS[0]], steps=3, seed=5))
    assert got.shape[1:3] == (112, 80)  # 80x112: already a multiple of 16
    assert_parity(distilled, request(["add snow"], [REFS[3]], steps=2, seed=5, width=96, height=80))


def test_text_only_and_a_batch_of_prompts_match_diffusers(distilled):
    assert_parity(distilled, request(["a red house by the sea"], [], steps=2, seed=11, width=80, height=64))
    assert_parity(distilled, request(["make it night", "add snow"], REFS[:2], steps=2, seed=12))


@pytest.mark.parametrize("count", [0, 2])
def test_base_true_cfg_matches_diffusers(base, count):
    size = {} if count else {"width": 64, "height": 64}
    req = request(["a portrait of a woman in a hat"], REFS[:count], steps=2, seed=9, guidance=4.0, **size)
    with_cfg = assert_parity(base, req)
    without = assert_parity(base, request(req.prompts, REFS[:count], steps=2, seed=9, guidance=1.0, **size))
    assert np.abs(with_cfg.astype(int) - without.astype(int)).max() > 8  # CFG ran


def test_base_default_guidance_is_diffusers_default(base):
    """No guidance given: ours runs the family's default (4.0), diffusers its own default; the same image."""
    req = request(["add snow"], REFS[:1], steps=2, seed=6)
    assert req.guidance is None
    assert_parity(base, req)
    assert edit(base[1], req).metadata["guidance"] == 4.0


def test_distilled_default_is_four_steps_as_bfl_runs_it(distilled):
    """No steps given: a step-distilled checkpoint runs 4 (BFL's model cards), the image diffusers makes with
    num_inference_steps=4."""
    pipe, ours = distilled
    req = request(["add snow"], REFS[:1], seed=6)
    ours.reset_times()
    result = edit(ours, req)
    assert len(ours.reset_times().seconds["transformer"]) == 4 and result.metadata["steps"] == 4
    got = np.stack([np.asarray(img) for img in result.images])
    assert np.abs(got.astype(int) - tiny_klein.diffusers_uint8(pipe, replace(req, steps=4)).astype(int)).max() <= 1


def test_large_reference_is_resized_then_cropped_as_diffusers(distilled):
    # Encoding a 1 MP reference through the VAE is slow on CPU; the decision is checked on its pixels instead.
    pipe, ours = distilled
    image = im.sample_image(1300, 900, seed=8)
    resized, (width, height) = klein.reference_size(*image.size, 16)
    proc = pipe.image_processor
    expected = proc._resize_to_target_area(image, 1024 * 1024)
    assert resized == expected.size and (width, height) == (expected.width // 16 * 16, expected.height // 16 * 16)
    expected = proc.preprocess(expected, height=height, width=width, resize_mode="crop")
    assert torch.equal(klein.reference_pixels(image, 16), expected)
