"""The recipe (one exclusion table, per-layer formats, ModelOpt config) and the calibration inputs."""
import json

import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.quant import calib_data
from kontext_trt.quant import recipe as rc


@pytest.fixture(scope="module")
def transformer(tiny_ckpt):
    from kontext_trt.core import checkpoint as ck
    return ck.load_transformer(ck.open_checkpoint(tiny_ckpt))


def test_layer_formats_follow_the_exclusions(transformer):
    fp8 = rc.make_recipe(transformer, "fp8", "bf16")
    nvfp4 = rc.make_recipe(transformer, "nvfp4", "fp8")
    kept = {"x_embedder", "context_embedder", "norm_out.linear", "proj_out",
            *(n for n in fp8.layers if n.startswith("time_text_embed."))}
    assert {n for n, f in fp8.layers.items() if f is None} == kept == {n for n, f in nvfp4.layers.items() if f is None}
    modulation = {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                  "single_transformer_blocks.1.norm.linear"}
    assert all(fp8.layers[n] == "fp8" and nvfp4.layers[n] == "fp8" for n in modulation)
    for name in ("single_transformer_blocks.0.proj_out", "transformer_blocks.1.attn.to_q",
                 "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
                 "single_transformer_blocks.1.proj_mlp"):
        assert fp8.layers[name] == "fp8" and nvfp4.layers[name] == "nvfp4"
    assert fp8.attention_layers == [] and len(nvfp4.attention_layers) == 4  # 2 double + 2 single blocks


def test_modelopt_config_calibrates_only_what_is_quantized(transformer):
    recipe = rc.make_recipe(transformer, "nvfp4", "fp8")
    entries = rc.modelopt_config(recipe)["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    names = {e["quantizer_name"]: e["cfg"] for e in entries[1:]}
    assert names["transformer_blocks.0.attn.to_q.input_quantizer"]["block_sizes"][-1] == 16
    assert names["transformer_blocks.0.norm1.linear.input_quantizer"] == rc.MODELOPT_FORMATS["fp8"]
    assert "x_embedder.input_quantizer" not in names and "single_transformer_blocks.0.attn.k_bmm_quantizer" in names
    assert not any("weight_quantizer" in n for n in names)


@pytest.mark.parametrize("precision, attention, message", [
    ("int3", None, "unknown precision 'int3': use fp8 or nvfp4"),
    ("fp8", "fp4", "unknown attention precision 'fp4': use fp8 or bf16"),
])
def test_unknown_names_are_refused(precision, attention, message):
    with pytest.raises(KontextError, match=message):
        rc.check_precision(precision, attention)
    assert rc.check_precision("nvfp4", None) == "fp8" and rc.check_precision("fp8", None) == "bf16"
    assert rc.check_precision("nvfp4", None, "flux2-klein") == "fp8"  # klein's attention has FP8 processors too


def test_fp8_attention_for_a_family_without_it_is_one_line():
    with pytest.raises(KontextError, match=r"^--attention fp8: a FLUX.2 \[dev\] transformer has no FP8 attention "
                                           r"here; .*use --attention bf16 \(the default\)$"):
        rc.check_precision("nvfp4", "fp8", "flux2-dev", "FLUX.2 [dev]")
    assert rc.check_precision("nvfp4", None, "flux2-dev") == "bf16"


def test_shipped_set_cycles_categories_and_is_deterministic():
    prompts = calib_data.default_prompts()
    assert len(prompts) == len(set(prompts)) == 40
    assert "snow on the roof" not in prompts[1] and "watercolor" in prompts[1]  # local, style, text, background, ...
    a, b = calib_data.drawn_pairs(3, small=True), calib_data.drawn_pairs(3, small=True)
    assert [p.image.size for p in a] == [(128, 96), (96, 128), (112, 112)]
    assert all(x.image.tobytes() == y.image.tobytes() and x.prompt == y.prompt for x, y in zip(a, b))
    assert calib_data.drawn_pairs(1)[0].image.size == (1024, 1024)
    held_out = calib_data.drawn_pairs(1, calib_data.REPORT_SEED)[0]
    assert held_out.source.startswith(f"drawn seed {calib_data.REPORT_SEED}")


def test_folder_and_jsonl_are_read(tmp_path, calib_jsonl):
    from kontext_trt.core.image import sample_image

    sample_image(96, 96, seed=3).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("Make the sky purple.\n")
    pairs = calib_data.calibration_pairs(tmp_path, 4)
    assert [(p.prompt, p.image.size) for p in pairs] == [("Make the sky purple.", (96, 96))]
    pairs = calib_data.calibration_pairs(calib_jsonl, 1)
    assert len(pairs) == 1 and pairs[0].prompt.startswith("Add snow")


@pytest.mark.parametrize("lines, message", [
    ([{"image": "nowhere.png", "prompt": "x"}], r"pairs.jsonl:1: calibration image .*nowhere.png does not exist"),
    (["{not json"], r"pairs.jsonl:1: not valid JSON"),
    ([{"image": "a.png"}], r"pairs.jsonl:1: each line needs a string \"image\" and a string \"prompt\""),
])
def test_bad_jsonl_is_one_line(tmp_path, lines, message):
    from kontext_trt.core.image import sample_image

    sample_image(64, 64).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    with pytest.raises(KontextError, match=message):
        calib_data.calibration_pairs(tmp_path / "pairs.jsonl", 4)


def test_empty_or_incomplete_folders(tmp_path):
    with pytest.raises(KontextError, match="no calibration data found in"):
        calib_data.calibration_pairs(tmp_path, 4)
    from kontext_trt.core.image import sample_image

    sample_image(64, 64).save(tmp_path / "b.png")
    with pytest.raises(KontextError, match=r"b.png has no instruction: write it into .*b.txt"):
        calib_data.calibration_pairs(tmp_path, 4)
    with pytest.raises(KontextError, match="does not exist"):
        calib_data.calibration_pairs(tmp_path / "missing", 4)


MODELOPT_LIST_FORM = (0, 44)  # ModelOpt CHANGELOG 0.44: quant_cfg is an ordered list of QuantizerCfgEntry dicts


def test_modelopt_floor_is_the_first_release_taking_the_list_form():
    """pyproject's floor is the release whose QuantizeConfig takes the list form modelopt_config passes (0.43 typed
    quant_cfg as a dict)."""
    import re
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (req,) = [r for r in extras["quant"] if r.startswith("nvidia-modelopt")]
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", req)[1].split("."))
    assert floor[:2] == MODELOPT_LIST_FORM
    assert tuple(int(x) for x in version("nvidia-modelopt").split(".")[:2]) >= floor[:2]


def test_installed_modelopt_takes_the_recipe_config(transformer):
    """The config the calibration passes validates as is (no dict-form conversion or its DeprecationWarning), and
    mtq.quantize on a small model calibrates exactly the quantizers the recipe names."""
    import warnings

    import torch
    from torch import nn

    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.config import QuantizeConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        parsed = QuantizeConfig.model_validate(rc.modelopt_config(rc.make_recipe(transformer, "nvfp4", "fp8")))
    assert isinstance(parsed.quant_cfg, list) and parsed.algorithm == "max"

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    recipe = rc.Recipe("nvfp4", "bf16", {"a": "nvfp4", "b": "fp8", "c": None}, [])
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    model = Small()
    with torch.no_grad():
        b_input = model.a(x).abs().max().item()  # calibration sees b's input unquantized
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model = mtq.quantize(model, rc.modelopt_config(recipe), lambda m: m(x))
    assert model.a.input_quantizer.is_enabled and model.a.input_quantizer.block_sizes[-1] == 16
    assert model.b.input_quantizer.is_enabled and model.b.input_quantizer.num_bits == (4, 3)
    assert float(model.b.input_quantizer.amax) == pytest.approx(b_input, rel=1e-6)
    assert not model.c.input_quantizer.is_enabled and not model.a.weight_quantizer.is_enabled
