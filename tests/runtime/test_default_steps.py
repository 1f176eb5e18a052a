"""Steps a request leaves out: the model's default, filled in by flow.with_defaults from the family data (FLUX.1 28;
FLUX.2 [klein] 4 step-distilled, 50 base), run and recorded in the result; a given count wins."""
from dataclasses import replace

import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime import flow

REF = im.sample_image(64, 64, seed=1)
PROMPT = "add snow"


def load(ckpt):
    return build_pipeline(LoadSpec(ckpt, dtype="fp32"))


@pytest.fixture(scope="module")
def klein(klein_tiny_ckpt):
    """klein-tiny and its encoding of PROMPT (text encoding is the slow part on a CPU; the loop runs from it)."""
    k = load(klein_tiny_ckpt)
    return k, flow.encode_prompts(k, [PROMPT])


def transformer_calls(k, req, prompt=None) -> tuple[int, flow.EditResult]:
    """How many times one edit ran the transformer, and its result."""
    k.reset_times()
    result = flow.edit(k, req, prompt)
    return len(k.reset_times().seconds["transformer"]), result


def test_the_family_data_says_each_checkpoints_steps():
    assert (FLUX1_KONTEXT.steps(distilled=True), FLUX1_KONTEXT.steps(distilled=False)) == (28, 28)
    assert (FLUX2_KLEIN.steps(distilled=True), FLUX2_KLEIN.steps(distilled=False)) == (4, 50)


def test_a_distilled_klein_edit_without_steps_runs_four(klein):
    k, prompt = klein
    req = flow.request([PROMPT], [REF], seed=2)
    assert req.steps is None
    calls, result = transformer_calls(k, req, prompt)
    assert calls == 4
    assert result.metadata["steps"] == 4 and result.metadata["cache"]["steps_computed"] == 4
    assert torch.equal(result.latents, flow.edit(k, replace(req, steps=4), prompt).latents)


def test_given_steps_win_over_the_default(klein):
    k, prompt = klein
    calls, result = transformer_calls(k, flow.request([PROMPT], [REF], steps=2), prompt)
    assert calls == 2 and result.metadata["steps"] == 2


def test_a_session_without_steps_runs_the_models_default_every_turn(klein):
    from kontext_trt.pipeline import KontextPipeline
    from kontext_trt.safety.guard import OutputPolicy

    session = KontextPipeline(klein[0], OutputPolicy(None, "none")).session(REF)
    turns = [session.edit(PROMPT), session.edit(PROMPT, steps=2)]
    assert [turn.metadata["steps"] for turn in turns] == [4, 2]


def test_a_base_klein_request_without_steps_runs_fifty(klein_tiny_base_ckpt):
    k = load(klein_tiny_base_ckpt)
    req = flow.request(["add snow"], [REF])
    filled = flow.with_defaults(k, req)
    assert (filled.steps, filled.guidance) == (50, 4.0) and flow.default_steps(k) == 50
    assert flow.batch_key(k, req) == flow.batch_key(k, replace(req, steps=50))
    assert flow.batch_key(k, req) != flow.batch_key(k, replace(req, steps=4))
    assert flow.with_defaults(k, replace(req, steps=7)).steps == 7


def still(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A transformer stage that predicts no motion: 28 real FLUX.1 steps take too long on a shared CPU."""
    return {"latent": torch.zeros_like(inputs["hidden_states"])}


def test_flux1_still_runs_28(tiny_ckpt_t32):
    k = load(tiny_ckpt_t32).with_stages(transformer=still)  # T5 reads 32 tokens: a quick text encoding
    req = flow.request([PROMPT], [], width=64, height=64)
    assert flow.with_defaults(k, req).steps == 28
    calls, result = transformer_calls(k, req)
    assert calls == 28 and result.metadata["steps"] == 28


def test_steps_are_checked_when_given_and_left_to_the_model_when_not():
    flow.check_request(flow.EditRequest(prompts=["x"]))  # None: the model's default, no error
    with pytest.raises(KontextError, match="steps must be at least 1, got 0"):
        flow.check_request(flow.EditRequest(prompts=["x"], steps=0))
