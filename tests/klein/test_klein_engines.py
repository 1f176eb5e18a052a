"""TensorRT-RTX engines of a FLUX.2 [klein] export, built ahead of time on this CPU host: profiles from the family's
axes (the transformer's tokens cover a target and 1 to 4 references at the sizes built), the family in the manifest
and in each plan's key. Deserializing a plan needs CUDA, which this host lacks: its header is checked instead."""
import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN
from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.engines import build, cache, profiles, trt_api
from kontext_trt.engines.skus import SKUS

trt_rtx = pytest.importorskip("tensorrt_rtx")
SIZES = ((64, 64), (96, 64))  # 16 and 24 tokens


def test_klein_profiles_cover_one_to_four_references():
    shapes = profiles.Shapes(SIZES, (1, 2))
    axes = profiles.axis_ranges(shapes, 512, FLUX2_KLEIN)
    assert axes["L"] == (16, 48, 5 * 24)  # the smallest target alone .. the largest with 4 references as large
    assert axes["S"] == (512, 512, 512) and axes["h"] == (4, 4, 4) and axes["w"] == (4, 6, 6)  # 16-pixel cells
    assert profiles.axis_ranges(shapes, 512)["L"] == (16, 48, 48)  # FLUX.1: one reference, as before
    onnx = {"hidden_states": ("batch", "image_tokens", 32), "encoder_hidden_states": ("batch", "text_tokens", 72),
            "timestep": ("batch",), "img_ids": ("image_tokens", 4), "txt_ids": ("text_tokens", 4)}
    profile = profiles.stage_profile("transformer", onnx, axes, FLUX2_KLEIN)
    assert profile["hidden_states"] == ((1, 16, 32), (1, 48, 32), (2, 120, 32))
    assert profile["img_ids"] == ((16, 4), (48, 4), (120, 4)) and profile["txt_ids"] == ((512, 4),) * 3


def test_klein_engines_build_with_the_family_profiles(klein_engines, klein_onnx):
    api = trt_api.load_api("tensorrt-rtx")
    folder = klein_engines / "rtx4090-sm89" / api.folder / "fp32"
    manifest = cache.read_engine_manifest(folder)
    assert manifest.family == "flux2-klein" and set(manifest.stages) == set(FLUX2_KLEIN.stage_names)
    assert manifest.tokens["total"] == [16, 48, 120]
    t = manifest.stages["transformer"]
    assert t["profile"]["hidden_states"]["max"] == [2, 120, 32] and t["axes"]["L"] == [16, 48, 120]
    assert manifest.stages["text_encoder"]["profile"]["attention_mask"]["max"] == [2, 512]
    assert manifest.stages["vae_encoder"]["profile"]["images"]["max"] == [1, 3, 64, 96]
    assert manifest.stages["vae_decoder"]["profile"]["latent"]["max"] == [2, 32, 4, 6]
    for stage in FLUX2_KLEIN.stage_names:
        plan = (folder / f"{stage}.plan").read_bytes()
        assert trt_api.rtx_header(plan) == (api.version, (89,))
        assert cache.plan_problem(folder / f"{stage}.plan", manifest.stages[stage]) is None
        # deserializing needs CUDA (tensorrt-rtx 1.7: "CUDA driver version is insufficient" here): the header check
        assert trt_api.inspect_plan(api, plan, gpu=False)["validity"].startswith("unchecked: the header is well formed")
        assert set(manifest.stages[stage]["inputs"]) == set(FLUX2_KLEIN.io(stage)[0])


def test_the_family_is_part_of_each_plan_key(klein_onnx):
    pick = read_onnx_dir(klein_onnx).pick("vae_decoder", None)
    target, flags = build.Target("tensorrt-rtx", (89,)), build.BuildFlags()
    keys = {family.name: build.stage_key(pick, {}, target, flags, "1.0", family.name)
            for family in (FLUX1_KONTEXT, FLUX2_KLEIN)}
    assert keys["flux1-kontext"] != keys["flux2-klein"]


def test_stages_the_family_lacks_are_refused(klein_onnx, tmp_path):
    req = build.BuildRequest(onnx_dir=klein_onnx, out=tmp_path, sku=SKUS["rtx4090"],
                             target=build.Target("tensorrt-rtx", (89,)), stages=("clip",))
    with pytest.raises(KontextError, match=r"--stages clip: .* is a FLUX.2 \[klein\] export, whose stages are "
                                        r"text_encoder,vae_encoder,transformer,vae_decoder"):
        build.build_set(req)
