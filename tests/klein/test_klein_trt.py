"""FLUX.2 [klein] on the TensorRT backend without a GPU: load_engines takes the family from the engine manifest (its
four stages, each with the family's I/O), a request's references are checked against the built profiles (target and
every reference in the transformer's tokens, each reference in the VAE encoder's), and the whole loop runs through
TrtStage on contexts that compute with the stages' ONNX in onnxruntime (kontext_trt/engines/fake_trt.py)."""
import shutil
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from kontext_trt.assemble import build_pipeline, load_engines, request_geometry
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX2_KLEIN
from kontext_trt.core.specs import LoadSpec
from kontext_trt.engines import cache, trt_api, trt_io, trt_pool
from kontext_trt.engines import device as gpus
from kontext_trt.engines import select as es
from kontext_trt.engines.fake_trt import FakeStream, OnnxContext, network_engine
from kontext_trt.engines.trt_stages import TrtStage
from kontext_trt.runtime.flow import edit, request
from kontext_trt.runtime.ort_stages import ort_session

pytest.importorskip("tensorrt_rtx")
API = trt_api.load_api("tensorrt-rtx")


def images(*sizes: tuple[int, int]) -> list:
    return [im.sample_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@pytest.fixture
def klein_set(klein_engines):
    """The klein engine set's folder and manifest."""
    folder = klein_engines / "rtx4090-sm89" / API.folder / "fp32"
    return folder, cache.read_engine_manifest(folder)


@pytest.fixture
def rtx4090(monkeypatch):
    """This host's 'GPU' is an RTX 4090 (sm89), so select_engines picks the sm89 set on the CPU."""
    monkeypatch.setattr(gpus, "detect_gpu", lambda: (gpus.Gpu("NVIDIA GeForce RTX 4090", 89, 24.0, 0), ""))


@pytest.fixture
def klein_fakes(klein_onnx, klein_set, rtx4090, monkeypatch):
    """Plans 'load' as FakeEngines with their TensorRT-RTX network's I/O and the manifest's profiles; contexts are
    OnnxContexts over each stage's ONNX in onnxruntime."""
    manifest = klein_set[1]
    engines = {}
    for stage in FLUX2_KLEIN.stage_names:
        engines[stage] = network_engine(klein_onnx / stage / "model.onnx", manifest.stages[stage])
        engines[stage]._session = ort_session(klein_onnx / stage / "model.onnx")
    monkeypatch.setattr(trt_api, "load_engine", lambda api, path: engines[path.stem])
    monkeypatch.setattr(trt_api, "create_context", lambda api, engine, runtime_cache=None, **options:
                        trt_api.ExecContext(OnnxContext(engine, options.get("native_graphs", False))))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())  # the pool load_engines makes
    return engines


def on_cpu(k):
    """The pipeline load_engines made (CUDA device, engines unloaded: low VRAM), its stages on a CPU pool."""
    pool = trt_pool.EnginePool(API, torch.device("cpu"), low_vram=True)
    pool.stream = FakeStream()
    for stage in k.stages.values():
        stage.pool = pool
    return replace(k, device=torch.device("cpu"))


def test_load_engines_makes_the_klein_stages(klein_engines, klein_set, klein_fakes):
    k = load_engines(klein_engines, "fp32", low_vram=True)
    manifest = klein_set[1]
    assert tuple(k.stages) == FLUX2_KLEIN.stage_names == ("text_encoder", "vae_encoder", "transformer", "vae_decoder")
    assert k.config.family == "flux2-klein" and k.tokenizer_2 is None and k.info.backend == "tensorrt-rtx"
    for name, stage in on_cpu(k).stages.items():
        assert isinstance(stage, TrtStage)
        assert (stage.input_names, stage.output_names) == FLUX2_KLEIN.io(name)
        assert set(stage.input_names) == set(manifest.stages[name]["inputs"])
        stage.pool.admit(stage)  # loads: the engine's I/O checked against the family's
        assert set(stage.specs) == {*FLUX2_KLEIN.io(name)[0], *FLUX2_KLEIN.io(name)[1]}
    with pytest.raises(KontextError, match="is not the transformer stage's"):  # FLUX.1's contract: not klein's
        trt_io.check_io("transformer", trt_io.engine_io(klein_fakes["transformer"]), "transformer.plan")


def test_tokenizers_and_config_of_another_family_are_refused(klein_engines, klein_distilled, tiny_ckpt, klein_fakes,
                                                             tmp_path):
    root = tmp_path / "engines"
    shutil.copytree(klein_engines, root)
    folder = root / "rtx4090-sm89" / API.folder / "fp32"
    manifest = cache.read_engine_manifest(folder)
    cache.write_manifest(folder, replace(manifest, onnx={"dir": str(tmp_path / "moved")}))  # the export is gone
    assert load_engines(root, "fp32", model=klein_distilled, low_vram=True).config.family == "flux2-klein"
    with pytest.raises(KontextError, match=r"run FLUX.2 \[klein\] and the tokenizers and loop config given are "
                                           r"FLUX.1 Kontext's: pass the export or checkpoint they were built from"):
        load_engines(root, "fp32", model=tiny_ckpt, low_vram=True)


def test_step_caching_is_refused_in_one_line(klein_engines, rtx4090):
    with pytest.raises(KontextError) as info:
        load_engines(klein_engines, "fp32", split=True)
    assert str(info.value) == ("step caching (--cache) runs the transformer in parts, which FLUX.2 [klein] engines "
                               "do not have: use --cache off")


def test_three_references_fit_the_profiles(klein_engines, rtx4090):
    req = request(["x"], images((64, 64), (96, 64), (64, 64)), width=64, height=64)
    assert request_geometry(req, FLUX2_KLEIN) == es.Geometry(64, 64, 1, (64, 64), ((96, 64), (64, 64)))
    chosen = es.select_engines(klein_engines, "fp32", geometry=partial(request_geometry, req))
    assert chosen.family is FLUX2_KLEIN and chosen.stages == FLUX2_KLEIN.stage_names
    four = request(["x"], images(*[(96, 64)] * 4), width=96, height=64)  # 24 + 4 * 24 = 120 tokens: the profile's max
    assert es.select_engines(klein_engines, "fp32", geometry=partial(request_geometry, four)).found.plans


@pytest.mark.parametrize("sizes, reason, field", [
    ([(64, 64)] * 5, "5 reference images, FLUX.2 [klein] engines take at most 4 (pass fewer --image)", "image"),
    ([(64, 64), (128, 64)], "vae_encoder W=128 outside 64..96", "size"),
])
def test_references_beyond_the_profiles_are_refused(klein_engines, rtx4090, sizes, reason, field):
    req = request(["x"], images(*sizes), width=64, height=64)
    with pytest.raises(KontextError) as info:
        es.select_engines(klein_engines, "fp32", geometry=partial(request_geometry, req))
    message = str(info.value)
    assert f"from {len(sizes)} images ({', '.join(f'{w}x{h}' for w, h in sizes)})" in message and reason in message
    assert "rebuild: kontext-trt build --onnx" in message and "\n" not in message
    assert (info.value.param, info.value.code) == (field, "out_of_range")


def test_cli_refuses_a_reference_larger_than_the_profile(klein_engines, rtx4090, tmp_path, capsys):
    paths = []
    for i, image in enumerate(images((64, 64), (96, 96))):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image.save(paths[-1])
    code = main(["edit", "--engines", str(klein_engines), *paths, "--prompt", "x", "--out", str(tmp_path / "o.png"),
                 "--width", "64", "--height", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "vae_encoder H=96 outside 64..64" in err and "--sizes 64x64,96x64,96x96" in err


def test_the_klein_loop_through_trt_stages_matches_onnxruntime(klein_engines, klein_onnx, klein_fakes):
    req = request(["a cat on a sofa"], images((64, 64), (96, 64), (64, 64)), width=64, height=64, steps=2, seed=3)
    k = on_cpu(load_engines(klein_engines, "fp32", geometry=partial(request_geometry, req), low_vram=True))
    ours = np.asarray(edit(k, req).images[0], dtype=np.int16)
    ort = np.asarray(edit(build_pipeline(LoadSpec(backend="onnxruntime", onnx=klein_onnx)), req).images[0], np.int16)
    assert ours.shape == (64, 64, 3) and ours.std() > 5
    assert np.abs(ours - ort).max() <= 2
    assert all(stage.loads >= 1 for stage in k.stages.values())  # every stage ran its engine
