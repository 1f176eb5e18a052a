"""The PNG `parameters` chunk read back by sd-parsers (an independent AUTOMATIC1111 infotext reader) and by the
key/value pattern of A1111's own parse_generation_parameters (for quoted values)."""
import json
import re

from PIL import Image
from sd_parsers import ParserManager

from kontext_trt.core import image as im
from kontext_trt.runtime.flow import PipelineInfo

# modules/infotext_utils.py of stable-diffusion-webui
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def edit_metadata(**changes) -> dict:
    info = PipelineInfo("tensorrt", "bf16", "fp8", "0123456789abcdef", "/ckpts/FLUX.1-Kontext-dev")
    meta = {"prompt": "add a red hat, keep the face", "negative_prompt": "blurry, low quality", "true_cfg": 1.5,
            "seed": 42, "steps": 28, "guidance": 2.5, "width": 1024, "height": 768, "auto_resize": True,
            "edited": True, **info.to_dict()}
    return {**meta, **changes}


def test_sd_parsers_reads_prompt_negative_and_settings(tmp_path):
    meta = edit_metadata()
    path = im.save_image(im.sample_image(64, 64), tmp_path / "o.png", meta)
    parsed = ParserManager().parse(path)
    assert parsed.generator.value == "AUTOMATIC1111"
    (sampler,) = parsed.samplers
    assert [p.value for p in sampler.prompts] == ["add a red hat, keep the face"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, low quality"]
    assert sampler.name == "Euler"
    assert sampler.parameters == {"steps": "28", "seed": "42", "cfg_scale": "1.5", "scheduler": "Simple"}
    assert parsed.metadata == {"Distilled CFG Scale": "2.5", "Size": "1024x768"}
    assert (sampler.model.name, sampler.model.hash) == ("FLUX.1-Kontext-dev", "0123456789abcdef")
    assert Image.open(path).text["kontext-trt"] == json.dumps(meta, sort_keys=True)  # our own chunk is unchanged


def test_no_negative_prompt_line_without_one():
    text = im.a1111_parameters(edit_metadata(negative_prompt=None, true_cfg=1.0, checkpoint=None))
    assert text.splitlines() == ["add a red hat, keep the face",
                                 "Steps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 1.0, "
                                 "Distilled CFG Scale: 2.5, Seed: 42, Size: 1024x768, Model: FLUX.1-Kontext-dev"]


def test_values_with_commas_or_colons_are_quoted_as_a1111_does():
    text = im.a1111_parameters(edit_metadata(source="/models/kontext, v2: fp8"))
    pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in A1111_PARAM.findall(text.splitlines()[-1])}
    assert pairs["Model"] == "kontext, v2: fp8"
    assert (pairs["Seed"], pairs["Size"], pairs["CFG scale"], pairs["Steps"]) == ("42", "1024x768", "1.5", "28")
