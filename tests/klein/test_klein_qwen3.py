"""klein's Qwen3 text encoder cut to the layers klein reads (9, 18, 27): the same prompt embeddings as diffusers'
Flux2KleinPipeline on an encoder of more layers (raw layer-27 output) and of exactly 27 (the final-normed one), the
deeper layers' weights never read, export, quant and the torch backend all cut, and a too-shallow encoder refused in one line."""
import json
import shutil

import pytest
import torch
from diffusers import Flux2KleinPipeline
from tiny_klein import PARITY_SIZES

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import klein_checkpoint as kc
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime import klein
from kontext_trt.synth.klein import KLEIN_TINY, write_klein

PROMPTS = ["a red house by the sea", "add snow"]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny klein whose Qwen3 has 31 layers (4 more than klein reads)."""
    sizes = {**PARITY_SIZES, "text_encoder": {**PARITY_SIZES["text_encoder"], "num_hidden_layers": 31}}
    return write_klein(tmp_path_factory.mktemp("qwen3") / "deep", sizes, True, 5)


def ours_and_diffusers(root) -> tuple[torch.Tensor, torch.Tensor]:
    """Our torch backend's prompt embeddings of PROMPTS and Flux2KleinPipeline.encode_prompt's, fp32."""
    pipe = Flux2KleinPipeline.from_pretrained(root, torch_dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        ref = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))[0]
    ours = klein.Flux2Klein().encode_prompts(build_pipeline(LoadSpec(root, backend="torch", dtype="fp32")), PROMPTS)
    return ours.text, ref


def test_a_deeper_encoder_runs_27_layers_and_matches_diffusers_exactly(deep, monkeypatch):
    ours, ref = ours_and_diffusers(deep)
    assert ours.shape == ref.shape == (2, 512, 3 * 24) and torch.equal(ours, ref)
    read: list[str] = []
    real_read = ck.read_safetensors
    monkeypatch.setattr(ck, "read_safetensors", lambda path, keep=None: read.extend(real_read(path, keep)) or
                        real_read(path, keep))
    model = kc.load_qwen3(ck.open_checkpoint(deep), torch.float32)
    assert len(model.layers) == model.config.num_hidden_layers == 27 and isinstance(model.norm, torch.nn.Identity)
    layers = {int(key.split(".")[2]) for key in read if key.startswith("model.layers.")}
    assert layers == set(range(27)) and "model.norm.weight" not in read  # layers 27..30 and the norm never read
    assert sum(p.numel() for p in model.parameters()) < 0.9 * sum(
        p.numel() for p in pipe_text_encoder(deep).model.parameters())


def pipe_text_encoder(root):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(root / "text_encoder", local_files_only=True)


def test_an_encoder_of_exactly_27_layers_keeps_its_final_norm_as_diffusers_reads_it(tmp_path):
    assert KLEIN_TINY["text_encoder"]["num_hidden_layers"] == 27
    root = write_klein(tmp_path / "synth", KLEIN_TINY, True, 6)
    ours, ref = ours_and_diffusers(root)
    assert torch.equal(ours, ref)
    model = kc.load_qwen3(ck.open_checkpoint(root), torch.float32)
    assert len(model.layers) == 27 and not isinstance(model.norm, torch.nn.Identity)


def test_export_quant_and_the_torch_backend_load_the_cut_encoder(deep):
    from kontext_trt.export.export import load_klein_stage
    from kontext_trt.quant.quantize import klein_aux_modules
    from kontext_trt.runtime.klein_stages import klein_stage_modules

    ckpt = ck.open_checkpoint(deep)
    for module in (load_klein_stage(ckpt, "text_encoder", torch.float32),
                   klein_aux_modules(ckpt, torch.float32)["text_encoder"],
                   klein_stage_modules(ckpt, torch.float32)["text_encoder"]):
        assert len(module.model.layers) == 27 and module.layers == (9, 18, 27)


def test_a_too_shallow_encoder_is_one_line(deep, tmp_path):
    root = tmp_path / "shallow"
    shutil.copytree(deep, root)
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    (root / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 26,
                                                                   "layer_types": config["layer_types"][:26]}))
    with pytest.raises(KontextError, match=r"text_encoder/config.json: a qwen3 of 26 layers, not a Qwen3 of at least "
                                           r"27 \(klein stacks the hidden states of layers 9, 18, 27\)") as info:
        ck.open_checkpoint(root)
    assert "\n" not in str(info.value) and info.value.code == "model_mismatch"
