"""Optimization profiles from the Kontext buckets, checked against hand-computed token counts."""
import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.core.image import KONTEXT_BUCKETS
from kontext_trt.engines import profiles
from kontext_trt.engines.profiles import Shapes

# (W/16) * (H/16) for each bucket, worked out by hand; mirrored buckets have the same count.
BUCKET_TOKENS = {
    (672, 1568): 42 * 98, (688, 1504): 43 * 94, (720, 1456): 45 * 91, (752, 1392): 47 * 87, (800, 1328): 50 * 83,
    (832, 1248): 52 * 78, (880, 1184): 55 * 74, (944, 1104): 59 * 69, (1024, 1024): 64 * 64,
}


def test_bucket_token_counts():
    assert len(KONTEXT_BUCKETS) == 17
    for (w, h) in KONTEXT_BUCKETS:
        assert profiles.tokens(w, h) == BUCKET_TOKENS.get((w, h), BUCKET_TOKENS.get((h, w)))
    assert BUCKET_TOKENS[(688, 1504)] == 4042 and BUCKET_TOKENS[(800, 1328)] == 4150


def test_token_ranges_all_buckets():
    ranges = profiles.token_ranges(Shapes())
    assert ranges["target"] == (4042, 4096, 4150)
    assert ranges["context"] == (0, 4096, 4150)  # 0: text-to-image has no context
    assert ranges["total"] == (4042, 8192, 8300)  # t2i at the smallest bucket .. largest edit of the largest image


def test_axis_ranges_all_buckets():
    axes = profiles.axis_ranges(Shapes(batch=(1, 4)))
    assert axes["B"] == (1, 1, 4)
    assert axes["W"] == axes["H"] == (672, 1024, 1568)
    assert axes["w"] == axes["h"] == (84, 128, 196)
    assert axes["L"] == (4042, 8192, 8300)


def test_other_sizes_and_static():
    sizes = profiles.parse_sizes("512x512,1024x768")
    assert profiles.token_ranges(Shapes(sizes))["total"] == (1024, 2 * 3072, 2 * 3072)  # opt: nearest to 4096 tokens
    static = profiles.token_ranges(Shapes(((1024, 1024),), static=True))
    assert static == {"target": (4096,) * 3, "context": (4096,) * 3, "total": (8192,) * 3}


def test_stage_profiles():
    axes = profiles.axis_ranges(Shapes(batch=(1, 2)), text_length=512)  # the export manifest's KontextConfig
    t = profiles.stage_profile("transformer", {"hidden_states": ("B", "L", 64), "img_ids": ("L", 3),
                                               "txt_ids": (512, 3), "encoder_hidden_states": ("B", "S", 4096)}, axes)
    assert t["hidden_states"] == ((1, 4042, 64), (1, 8192, 64), (2, 8300, 64))
    assert t["img_ids"] == ((4042, 3), (8192, 3), (8300, 3))
    assert t["encoder_hidden_states"] == ((1, 512, 4096), (1, 512, 4096), (2, 512, 4096))  # text length fixed
    vae = profiles.stage_profile("vae_decoder", {"latent": ("B", 16, "h", "w")}, axes)
    assert vae["latent"] == ((1, 16, 84, 84), (1, 16, 128, 128), (2, 16, 196, 196))
    clip = profiles.stage_profile("clip", {"input_ids": ("B", "seq")}, axes)
    assert clip["input_ids"] == ((1, 77), (1, 77), (2, 77))


def test_profile_refusals():
    axes = profiles.axis_ranges(Shapes(batch=(1, 4)))
    with pytest.raises(KontextError, match="fixed size 1 on axis 0"):
        profiles.stage_profile("t5", {"input_ids": (1, 512)}, axes)
    with pytest.raises(KontextError, match="not in the stage contract"):
        profiles.stage_profile("t5", {"attention_mask": ("B", 512)}, axes)
    with pytest.raises(KontextError, match="symbolic"):  # no manifest gives the text length: the ONNX must
        profiles.stage_profile("t5", {"input_ids": ("B", "S")}, axes)
    for bad in ("1000x1000", "32x32", "big"):
        with pytest.raises(KontextError):
            profiles.parse_sizes(bad)
    assert profiles.parse_batch("1-4") == (1, 4) and profiles.parse_batch("2") == (2, 2)


def test_text_length_comes_from_the_export_not_a_constant():
    axes = profiles.axis_ranges(Shapes(batch=(1, 2)), text_length=32)
    assert axes["S"] == (32, 32, 32)
    t5 = profiles.stage_profile("t5", {"input_ids": ("B", 32)}, axes)
    assert t5["input_ids"] == ((1, 32), (1, 32), (2, 32))
    t = profiles.stage_profile("transformer", {"txt_ids": ("S", 3), "encoder_hidden_states": ("B", 32, 4096)}, axes)
    assert t["txt_ids"] == ((32, 3), (32, 3), (32, 3))
    assert t["encoder_hidden_states"] == ((1, 32, 4096), (1, 32, 4096), (2, 32, 4096))
    body = profiles.stage_profile("transformer_body", {"block_encoder_hidden_states": ("B", "S", 3072)}, axes)
    assert body["block_encoder_hidden_states"] == ((1, 32, 3072), (1, 32, 3072), (2, 32, 3072))
    with pytest.raises(KontextError, match="512 T5 tokens in the ONNX but its export manifest says text_length 32"):
        profiles.stage_profile("t5", {"input_ids": ("B", 512)}, axes)
    no_manifest = profiles.axis_ranges(Shapes(batch=(1, 2)))  # a bare ONNX folder: its own static text size
    assert "S" not in no_manifest
    assert profiles.stage_profile("t5", {"input_ids": ("B", 32)}, no_manifest)["input_ids"] == ((1, 32), (1, 32),
                                                                                                   (2, 32))
