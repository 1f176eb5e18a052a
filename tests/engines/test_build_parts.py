"""The transformer's three step-cache parts built with TensorRT-RTX on this CPU host (same profiles as the single
transformer, weight streaming on the body), and run on a GPU with CUDA graphs (skipped without one)."""
import pytest

from kontext_trt.assemble import build_pipeline, load_engines
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec, parse_cache
from kontext_trt.core.stages import SPLIT_STAGE_NAMES, TRANSFORMER_PARTS
from kontext_trt.engines import cache, profiles, trt_api
from kontext_trt.runtime.flow import EditRequest, edit

RTX = trt_api.load_api("tensorrt-rtx").folder


@pytest.fixture(scope="module")
def built_parts(tiny_onnx_split, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines-split")
    assert main(["build", "--onnx", str(tiny_onnx_split), "--out", str(root), "--sku", "rtx4090", "--weight-streaming",
                 "--stages", "transformer", *TRANSFORMER_PARTS]) == 0
    return root


@pytest.mark.slow  # built_parts: the transformer and its parts built, ~18 s
def test_parts_build_with_the_transformer_profiles(built_parts):
    folder = built_parts / "rtx4090-sm89" / RTX / "fp32"
    manifest = cache.read_engine_manifest(folder)
    api = trt_api.load_api("tensorrt-rtx")
    single = manifest.stages["transformer"]
    for part in TRANSFORMER_PARTS:
        entry = manifest.stages[part]
        plan = (folder / entry["file"]).read_bytes()
        assert len(plan) == entry["engine_bytes"] > 0 and trt_api.rtx_header(plan) == (api.version, (89,))
        assert single["axes"] == {"B": [1, 1, 1], "L": [4042, 8192, 8300], "S": [512, 512, 512]}  # S: manifest's
        text = {} if part == "transformer_tail" else {"S": [512, 512, 512]}  # the tail sees no text tokens
        assert entry["axes"] == {"B": [1, 1, 1], "L": [4042, 8192, 8300], **text}
        for name, shape in entry["profile"].items():
            axes = profiles.STAGE_AXES[part][name]
            assert len(shape["min"]) == len(axes)
            if axes[:2] == ("B", "L"):
                assert shape["max"][:2] == single["profile"]["hidden_states"]["max"][:2] == [1, 8300]
        assert entry["flags"]["weight_streaming"] == (part == "transformer_body")
    assert "transformer_head" in manifest.command  # the rebuild line keeps the parts


@pytest.mark.slow  # built_parts: the transformer and its parts built, ~18 s
def test_engine_lookup_swaps_the_transformer_for_its_parts(built_parts):
    folder = built_parts / "rtx4090-sm89" / RTX / "fp32"
    assert SPLIT_STAGE_NAMES == ("clip", "t5", "vae_encoder", *TRANSFORMER_PARTS, "vae_decoder")
    found = cache.find_engines(built_parts, "rtx4090", RTX, "fp32", 1024, 1024, 1, None,
                               ("transformer_head", "transformer_body", "transformer_tail"))
    assert sorted(found.plans) == sorted(TRANSFORMER_PARTS) and found.folder == folder
    with pytest.raises(KontextError, match="stage clip, t5, vae_decoder not built in"):
        cache.find_engines(built_parts, "rtx4090", RTX, "fp32", 1024, 1024, 1, None, SPLIT_STAGE_NAMES)


@pytest.mark.slow  # built_parts: the transformer and its parts built, ~18 s
def test_split_refuses_low_vram(built_parts):
    with pytest.raises(KontextError, match="--low-vram keeps one engine on the GPU"):
        load_engines(built_parts, split=True, low_vram=True)


@pytest.mark.cuda
def test_cached_edit_on_engines_with_cuda_graphs(tensorrt_gpu, tiny_ckpt, tiny_onnx_split, tmp_path, monkeypatch):
    """On a GPU: the parts' engines for this GPU run the cached loop with each part CUDA-graphed; T = 0 matches the
    single transformer engine's edit and a huge T computes only the protected steps."""
    from kontext_trt.runtime.cudagraphs import graphed

    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert main(["build", "--onnx", str(tiny_onnx_split), "--out", str(tmp_path), "--sizes", "64x64,96x64"]) == 0
    single = build_pipeline(LoadSpec(None, backend="tensorrt", engines=tmp_path, precision="fp32"))
    split = build_pipeline(LoadSpec(None, backend="tensorrt", engines=tmp_path, precision="fp32", cache=parse_cache("fbcache")))
    assert "transformer" not in split.stages and set(TRANSFORMER_PARTS) <= set(split.stages)
    split.stages = graphed(split.stages)
    req = EditRequest(prompts=["add a cat"], image=im.sample_image(96, 64, seed=3), steps=6, seed=5, auto_resize=False)
    off = edit(single, req)
    for spec in ("off", "fbcache:0"):
        cached = edit(split, EditRequest(**{**req.__dict__, "cache": spec}))
        assert (cached.latents - off.latents).abs().max().item() < 1e-4
    skipped = edit(split, EditRequest(**{**req.__dict__, "cache": "fbcache:1e9"}))
    assert skipped.metadata["cache"]["steps_computed"] == 2
    assert split.stages["transformer_body"].stats()["replays"] >= 1
