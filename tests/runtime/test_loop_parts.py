"""The loop's parts against diffusers' own implementations: buckets, schedule, packing, ids, noise, pixels."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS, FluxKontextPipeline
from diffusers.utils.torch_utils import randn_tensor

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.runtime.latents import draw_noise, latent_ids, pack_latents, unpack_latents
from kontext_trt.runtime.schedule import flow_schedule, shift_mu


def test_buckets_are_the_kontext_resolutions():
    assert list(im.KONTEXT_BUCKETS) == [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]


@pytest.mark.parametrize("size,bucket", [((1000, 1000), (1024, 1024)), ((1920, 1080), (1392, 752)),
                                         ((600, 1200), (720, 1456)), ((4000, 1000), (1568, 672))])
def test_pick_bucket(size, bucket):
    assert im.pick_bucket(*size) == bucket


def test_context_size_without_auto_resize_floors_to_16():
    assert im.context_size(203, 117, auto_resize=False) == (192, 112)


def test_mu_matches_reference_points():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(8192) == pytest.approx(1.15 + 0.65 / 3840 * 4096)


@pytest.mark.parametrize("steps,tokens", [(28, 4096), (1, 16), (4, 48), (30, 3876), (50, 9000)])
def test_schedule_is_bit_exact_with_diffusers(steps, tokens):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                            base_shift=0.5, max_shift=1.15, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(tokens))
    ours = flow_schedule(steps, tokens)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    assert torch.equal(ours, sched.sigmas)


def test_pack_unpack_match_diffusers_and_invert():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxKontextPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(FluxKontextPipeline._unpack_latents(packed, 48, 80, 8), x)


def test_ids_match_diffusers():
    ours = latent_ids(6, 10, index=1)
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    ref[..., 0] = 1
    assert torch.equal(ours, ref)
    assert ours.shape == (15, 3)


def test_noise_is_drawn_like_the_references():
    ours = draw_noise(2, 16, 96, 64, seed=7)
    ref = randn_tensor((2, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    assert torch.equal(ours, ref)


def test_pixels_match_diffusers_image_processor():
    img = im.sample_image(203, 117, seed=1)
    proc = VaeImageProcessor(vae_scale_factor=16)
    ref = proc.preprocess(proc.resize(img, 112, 192), 112, 192)
    assert torch.equal(im.image_to_tensor(img, 192, 112), ref)
    back = im.tensor_to_images(ref)[0]
    assert back.size == (192, 112)
    assert np.array_equal(np.asarray(back), np.asarray(proc.postprocess(ref, output_type="pil")[0]))


@pytest.mark.parametrize("w,h,msg", [(100, 64, "multiple of 16"), (64, 4096, "out of range"), (32, 64, "out of range")])
def test_bad_sizes(w, h, msg):
    with pytest.raises(KontextError, match=msg):
        im.check_size(w, h)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(KontextError, match="bad.png is unreadable"):
        im.load_image(bad)
    with pytest.raises(KontextError, match="does not exist"):
        im.load_image(tmp_path / "missing.png")


def test_png_metadata_round_trip_and_atomic_write(tmp_path):
    from PIL import Image
    path = im.save_image(im.sample_image(64, 64), tmp_path / "o.png", {"seed": 3, "prompt": "x"})
    assert Image.open(path).text["kontext-trt"] == '{"prompt": "x", "seed": 3}'
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    with pytest.raises(KontextError, match="does not exist"):
        im.save_image(im.sample_image(64, 64), tmp_path / "nope" / "o.png", {})
