"""Multi-turn sessions: outputs feed the next turn, prompt and input-latent caches hit."""
import numpy as np
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.session import EditSession


def test_each_turn_edits_the_previous_output(tiny_ckpt):
    k = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))
    session = EditSession(k, im.sample_image(64, 64), steps=2, seed=1, auto_resize=False)
    first = session.edit("make it night")
    second = session.edit("add stars")
    assert len(session.history) == 2 and session.image is second.images[0]
    direct = edit(k, EditRequest(prompts=["add stars"], image=first.images[0], steps=2, seed=1, auto_resize=False))
    assert torch.equal(direct.latents, second.latents)


def test_caches_skip_repeated_encoding(tiny_ckpt):
    k = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))
    image = im.sample_image(64, 64)
    session = EditSession(k, image, steps=1, auto_resize=False)
    a = session.run(EditRequest(prompts=["a hat"], image=image, steps=1, seed=1, auto_resize=False))
    b = session.run(EditRequest(prompts=["a hat"], image=image, steps=1, seed=2, auto_resize=False))
    assert len(k.times.seconds["t5"]) == 1 and len(k.times.seconds["vae_encoder"]) == 1
    assert len(k.times.seconds["transformer"]) == 2
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_klein_session_keeps_every_reference_the_output_first(klein_tiny_ckpt):
    """FLUX.2 [klein]: each turn's output replaces the first reference and the other references stay, in order."""
    from kontext_trt.pipeline import KontextPipeline
    from kontext_trt.runtime.flow import request
    from kontext_trt.safety.guard import OutputPolicy

    k = build_pipeline(LoadSpec(klein_tiny_ckpt, dtype="fp32"))
    refs = [im.sample_image(64, 64, seed=1), im.sample_image(96, 64, seed=2), im.sample_image(80, 112, seed=3)]
    session = KontextPipeline(k, OutputPolicy(None, "none", watermark=False)).session(
        images=refs, num_inference_steps=2, generator_seed=4)
    first = session.edit("make it night")
    second = session.edit("add stars")
    assert first.metadata["references"] == second.metadata["references"] == 3
    assert session.image is second.images[0] and session.references == refs[1:]
    direct = edit(k, request(["add stars"], [first.images[0], *refs[1:]], steps=2, seed=4))
    assert torch.equal(direct.latents, second.latents)
    assert first.metadata["guidance"] == 4.0  # klein's default
