"""The family a checkpoint is, from its model_index.json; what each family refuses of a request; multi-reference
editing through the CLI and the Python API."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, detect_family
from kontext_trt.core.specs import LoadSpec, parse_cache
from kontext_trt.pipeline import KontextPipeline
from kontext_trt.runtime.flow import KontextConfig, check_request, edit, request


def test_family_is_read_from_model_index(tiny_ckpt, klein_distilled, klein_base, tmp_path):
    assert detect_family(tiny_ckpt) is FLUX1_KONTEXT and detect_family(klein_distilled) is FLUX2_KLEIN
    assert detect_family(tmp_path) is FLUX1_KONTEXT  # no model_index.json: BFL single files
    distilled, base = ck.open_checkpoint(klein_distilled), ck.open_checkpoint(klein_base)
    assert (distilled.family, KontextConfig.from_checkpoint(distilled).distilled) == ("flux2-klein", True)
    assert KontextConfig.from_checkpoint(base).distilled is False
    config = KontextConfig.from_checkpoint(base)
    assert KontextConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert (config.latent_channels, config.vae_scale_factor, config.text_layers) == (8, 8, (9, 18, 27))


def test_an_unknown_pipeline_class_is_one_line_naming_the_supported(klein_distilled, tmp_path):
    root = tmp_path / "other"
    shutil.copytree(klein_distilled, root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    with pytest.raises(KontextError, match=r"_class_name is 'Flux2Pipeline'.*FluxKontextPipeline \(FLUX.1 Kontext\), "
                                           r"Flux2KleinPipeline \(FLUX.2 \[klein\]\)") as info:
        ck.open_checkpoint(root)
    assert "\n" not in str(info.value)


def test_requests_each_family_refuses(tiny_ckpt, klein_distilled):
    refs = [im.sample_image(64, 64, seed=i) for i in range(5)]
    with pytest.raises(KontextError, match="5 reference images were given; at most 4"):
        check_request(request(["x"], refs))
    flux1 = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))
    with pytest.raises(KontextError, match=r"FLUX.1 Kontext edits from one image, 2 were given"):
        edit(flux1, request(["x"], refs[:2], steps=1, auto_resize=False))
    klein = build_pipeline(LoadSpec(klein_distilled, dtype="fp32"))
    for fields, message in [({"true_cfg": 2.0, "negative_prompt": "x"}, "takes no --true-cfg"),
                            ({"negative_prompt": "blurry"}, "step-distilled and runs without CFG"),
                            ({"cache": parse_cache("fbcache")},
                             "step caching is not available")]:
        with pytest.raises(KontextError, match=message):
            edit(klein, request(["x"], refs[:1], steps=1, **fields))
    with pytest.raises(KontextError, match="a reference image is 40x64"):
        edit(klein, request(["x"], [im.sample_image(40, 64)], steps=1))
    # FLUX.1 cannot take a 2112-pixel side at its own size; klein shrinks any reference to 1 MP, auto_resize or not
    wide = request(["x"], [Image.new("RGB", (2112, 1056))], steps=1, auto_resize=False)
    check_request(wide)
    klein.ops.check(klein, wide)
    with pytest.raises(KontextError, match="the input image is 2112x1056: too large to edit at its own size"):
        flux1.ops.check(flux1, wide)


def test_api_images_list_is_the_loop_on_the_same_request(klein_distilled):
    pipe = KontextPipeline.load(klein_distilled, device="cpu", dtype="fp32", safety_checker="none")
    refs = [im.sample_image(64, 64, seed=1), im.sample_image(96, 64, seed=2)]
    result = pipe("add snow", images=refs, num_inference_steps=2, generator_seed=4)
    direct = edit(pipe.kontext, request(["add snow"], refs, steps=2, seed=4))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(direct.images[0]))
    assert result.metadata["references"] == 2 and result.metadata["edited"] is True
    with pytest.raises(KontextError, match="not both"):
        pipe("x", image=refs[0], images=refs)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_takes_repeated_image_flags(capsys, tiny_ckpt, klein_distilled, tmp_path):
    paths = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 80), (64, 64), (64, 64)]):
        paths.append(tmp_path / f"ref{i}.png")
        im.sample_image(*size, seed=i).save(paths[-1])
    out = tmp_path / "out.png"
    images = [arg for path in paths[:3] for arg in ("--image", path)]
    code, stdout, _ = run_cli(capsys, "edit", "--model", klein_distilled, *images, "--prompt", "add a moon", "--out",
                              out, "--steps", 2, "--dtype", "fp32", "--safety-checker", "none")
    assert code == 0 and str(out) in stdout
    meta = json.loads(Image.open(out).text["kontext-trt"])
    assert (meta["width"], meta["height"], meta["references"]) == (64, 64, 3)
    five = [arg for path in paths for arg in ("--image", path)]
    code, _, err = run_cli(capsys, "edit", "--model", klein_distilled, *five, "--prompt", "x", "--out",
                           tmp_path / "five.png")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: 5 reference images were given")
    code, _, err = run_cli(capsys, "edit", "--model", tiny_ckpt, *images[:4], "--prompt", "x", "--out",
                           tmp_path / "two.png", "--safety-checker", "none")
    assert code == 2 and "FLUX.1 Kontext edits from one image, 2 were given" in err.strip().splitlines()[-1]
    assert not (tmp_path / "five.png").exists() and not (tmp_path / "two.png").exists()
