"""find_engines: a match, and the one-line errors for another GPU, another library version, another size."""
import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.engines import trt_api
from kontext_trt.engines.cache import find_engines
from kontext_trt.engines.skus import SKUS

RTX = trt_api.load_api("tensorrt-rtx").folder


def lookup_error(built, **kw) -> str:
    args = dict(sku="rtx4090", flavor_version=RTX, precision="fp32", width=1024, height=1024, context=(1024, 1024))
    with pytest.raises(KontextError) as info:
        find_engines(built, **{**args, **kw})
    message = str(info.value)
    assert "\n" not in message and "built here: rtx4090-sm89/" in message and "rebuild: kontext-trt build" in message
    return message


def test_match(built):
    found = find_engines(built, SKUS["rtx4090"], RTX, "fp32", 1024, 1024, context=(800, 1328))
    assert sorted(found.plans) == ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"]
    assert found.runtime_cache == found.folder / "runtime.cache" and found.manifest.sku == "rtx4090"
    t2i = find_engines(built, "rtx4090", RTX, "fp32", 688, 1504)  # text-to-image first: fewest tokens
    assert sorted(t2i.plans) == sorted(found.plans)  # the encoder too, for the edit that may come next


def test_other_gpu(built):
    message = lookup_error(built, sku="rtx5090")
    assert message.startswith(f"no engines for rtx5090-sm120/{RTX}/fp32")
    assert "--backend tensorrt-rtx --sku rtx5090 --target sm120 --precision fp32" in message


def test_other_version(built):
    message = lookup_error(built, flavor_version="tensorrt-rtx-1.8.0.1")
    assert "rtx4090-sm89/tensorrt-rtx-1.8.0.1/fp32" in message and f"rtx4090-sm89/{RTX}/fp32 (sizes all" in message
    assert "--backend tensorrt-rtx --sku rtx4090" in message


def test_other_size(built):
    message = lookup_error(built, width=1536, height=1536, context=None)
    assert "transformer L=9216 outside 4042..8300" in message and "vae_decoder W=1536 outside 672..1568" not in message
    assert "1536x1536" in message and "--sku rtx4090" in message
    message = lookup_error(built, batch=2)
    assert "B=2 outside 1..1" in message and "--batch 1-2" in message


def test_missing_stage(engine_onnx, tmp_path):
    from kontext_trt.engines import build

    build.build_set(build.BuildRequest(onnx_dir=engine_onnx, out=tmp_path, sku=SKUS["rtx4090"],
                                       target=build.Target("tensorrt-rtx", (89,)), stages=("clip",)))
    with pytest.raises(KontextError) as info:
        find_engines(tmp_path, "rtx4090", RTX, "fp32", 1024, 1024)
    message = str(info.value)
    assert "stage t5, transformer, vae_decoder not built" in message  # text-to-image needs no encoder
    assert message.endswith("--batch 1 --stages clip t5 transformer vae_decoder")


def test_encoder_batch_is_one_whatever_the_batch(engine_onnx, tmp_path):
    """A set built for --batch 2 serves batch-2 edits: the one context image is encoded at batch 1."""
    from kontext_trt.engines import build
    from kontext_trt.engines.profiles import Shapes

    folder, _ = build.build_set(build.BuildRequest(
        onnx_dir=engine_onnx, out=tmp_path, sku=SKUS["rtx4090"], target=build.Target("tensorrt-rtx", (89,)),
        shapes=Shapes(((64, 64),), (2, 2)), stages=("vae_encoder", "transformer")))
    found = find_engines(tmp_path, "rtx4090", RTX, "fp32", 64, 64, batch=2, context=(64, 64),
                         stages=("vae_encoder", "transformer"))
    encoder = found.manifest.stages["vae_encoder"]
    assert encoder["profile"]["images"]["min"][0] == encoder["profile"]["images"]["max"][0] == 1
    assert "B" not in encoder["axes"] and found.manifest.stages["transformer"]["axes"]["B"] == [2, 2, 2]
