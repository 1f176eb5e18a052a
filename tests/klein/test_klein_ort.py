"""The ONNX Runtime backend over a FLUX.2 [klein] export (fp32) against diffusers' Flux2KleinPipeline on the same seed:
1, 2 and 4 references, swapped order, references of different sizes, within 2 uint8 levels; and through the CLI."""
import json

import numpy as np
import pytest
import tiny_klein
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import edit, request

REFS = [im.sample_image(64, 64, seed=1), im.sample_image(96, 64, seed=2), im.sample_image(80, 112, seed=3),
        im.sample_image(128, 72, seed=4)]


@pytest.fixture(scope="module")
def pair(klein_distilled, klein_onnx):
    pipe = Flux2KleinPipeline.from_pretrained(klein_distilled, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, build_pipeline(LoadSpec(backend="onnxruntime", onnx=klein_onnx))


def assert_parity(pair, req) -> np.ndarray:
    assert pair[1].info.backend == "onnxruntime"
    return tiny_klein.assert_parity(pair, req, levels=2)  # ONNX Runtime fp32: within two uint8 levels


@pytest.mark.parametrize("count", [1, 2, 4])
def test_references_match_diffusers(pair, count):
    got = assert_parity(pair, request(["turn the house red"], REFS[:count], steps=2, seed=7))
    assert got.shape[1:3] == (64, 64)  # the first reference's size


def test_swapped_order_matches_diffusers_and_matters(pair):
    forward = assert_parity(pair, request(["a cat on the roof"], REFS[:2], steps=2, seed=3, width=64, height=64))
    swapped = assert_parity(pair, request(["a cat on the roof"], REFS[1::-1], steps=2, seed=3, width=64, height=64))
    assert np.abs(forward.astype(int) - swapped.astype(int)).max() > 8


def test_references_of_other_sizes_match_diffusers(pair):
    got = assert_parity(pair, request(["add snow"], [REFS[2], REFS[3], REFS[0]], steps=2, seed=5))
    assert got.shape[1:3] == (112, 80)


def test_cli_edit_on_onnxruntime_takes_several_images(pair, klein_onnx, tmp_path, capsys):
    paths = []
    for i, ref in enumerate(REFS[:3]):
        paths.append(tmp_path / f"ref{i}.png")
        ref.save(paths[-1])
    out = tmp_path / "out.png"
    images = [arg for path in paths for arg in ("--image", str(path))]
    code = main(["edit", "--backend", "onnxruntime", "--onnx", str(klein_onnx), *images, "--prompt", "add a moon",
                 "--out", str(out), "--steps", "2", "--seed", "4", "--safety-checker", "none"])
    assert code == 0 and str(out) in capsys.readouterr().out
    meta = json.loads(Image.open(out).text["kontext-trt"])
    assert (meta["backend"], meta["references"], meta["width"], meta["height"]) == ("onnxruntime", 3, 64, 64)
    direct = edit(pair[1], request(["add a moon"], [Image.open(p) for p in paths], steps=2, seed=4))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(direct.images[0]))
