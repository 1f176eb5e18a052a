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
