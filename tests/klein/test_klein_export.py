"""`kontext-trt export` of a FLUX.2 [klein] checkpoint: the family's four stages with its I/O names and dynamic dims,
the family in the manifest, each stage in ONNX Runtime against its torch module, and one-line refusals naming the
family."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_klein import transformer_case

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import checkpoint as ck
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.family import FLUX2_KLEIN
from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.klein_stages import klein_stage_modules

TOL = 1e-4  # max abs difference relative to the output's max abs value


@pytest.mark.slow  # makes klein_onnx (~60 s): early, so that its other users find it made instead of waiting
def test_manifest_records_the_family_its_names_and_dims(klein_onnx):
    manifest = read_export_manifest(klein_onnx)
    assert manifest.family is FLUX2_KLEIN and manifest.kontext["family"] == "flux2-klein"
    assert manifest.tokenizers == {"qwen": "tokenizer"} and (klein_onnx / "tokenizer" / "tokenizer.json").is_file()
    assert tuple(manifest.stages) == FLUX2_KLEIN.stage_names
    for stage, entry in manifest.stages.items():
        ins, outs = FLUX2_KLEIN.io(stage)
        assert [v["name"] for v in entry["inputs"]] == list(ins) and [v["name"] for v in entry["outputs"]] == list(outs)
    t = {v["name"]: v["shape"] for v in manifest.stages["transformer"]["inputs"]}
    assert t["hidden_states"][:2] == ["batch", "image_tokens"] and t["img_ids"] == ["image_tokens", 4]
    assert t["encoder_hidden_states"][:2] == ["batch", "text_tokens"] and t["txt_ids"] == ["text_tokens", 4]
    assert manifest.stages["transformer"]["dims"]["image_tokens"] == {"min": 16, "opt": 8192, "max": 32768,
                                                                      "multiple_of": 1}  # 2048^2 + 4 1 MP references
    assert manifest.stages["vae_encoder"]["dims"]["height"]["multiple_of"] == 16
    assert {v["name"]: v["shape"] for v in manifest.stages["vae_decoder"]["outputs"]}["images"] == \
        ["batch", 3, "16*latent_height", "16*latent_width"]
    assert {stage: set(found) for stage, found in read_onnx_dir(klein_onnx).stages.items()} == \
        {stage: {"fp32"} for stage in FLUX2_KLEIN.stage_names}  # each graph recognised as its klein stage


@pytest.fixture(scope="module")
def modules(klein_distilled):
    return klein_stage_modules(ck.open_checkpoint(klein_distilled), torch.float32)


def text_case(batch: int, length: int, used: int) -> dict:
    mask = torch.zeros(batch, length, dtype=torch.int64)
    mask[:, :used] = 1
    return {"input_ids": torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(length)),
            "attention_mask": mask}


CASES = {
    "text_encoder": [text_case(1, 512, 30), text_case(2, 40, 12)],
    "vae_encoder": [{"images": torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(w)) * 2 - 1}
                    for b, w, h in ((1, 64, 64), (1, 96, 64), (2, 64, 112))],
    "vae_decoder": [{"latent": torch.randn(b, 32, h, w, generator=torch.Generator().manual_seed(w))}
                    for b, w, h in ((1, 4, 4), (2, 6, 4))],
    "transformer": [transformer_case(1, [], 512, 1), transformer_case(1, [(4, 4)], 512, 2),
                    transformer_case(2, [(4, 6), (7, 5), (4, 4), (8, 4)], 512, 3)],
}


@pytest.mark.parametrize("stage,case", [(s, i) for s, cases in CASES.items() for i in range(len(cases))])
def test_each_stage_in_onnxruntime_matches_its_torch_module(klein_onnx, modules, stage, case):
    inputs = CASES[stage][case]
    ins, outs = FLUX2_KLEIN.io(stage)
    with torch.inference_mode():
        expected = modules[stage](*(inputs[n] for n in ins))
    session = ort.InferenceSession(str(klein_onnx / stage / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(list(outs), {n: t.numpy() for n, t in inputs.items()})
    for name, ref, out in zip(outs, expected, got):
        assert out.shape == tuple(ref.shape), name
        assert np.abs(out - ref.numpy()).max() <= TOL * ref.abs().max().item(), name


def test_stages_of_another_family_are_one_line_naming_the_family(klein_distilled, tmp_path, capsys):
    code = main(["export", "--model", str(klein_distilled), "--out", str(tmp_path / "o"), "--stages", "clip,t5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "unknown stage 'clip' for a FLUX.2 [klein] checkpoint: choose from text_encoder,vae_encoder," in err
    assert not (tmp_path / "o").exists()


def test_onnxruntime_backend_names_the_missing_stage(klein_onnx, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = json.loads((klein_onnx / "manifest.json").read_text())
    del manifest["stages"]["text_encoder"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KontextError, match=r"stage text_encoder was not exported; run `kontext-trt export --model "
                                           r"CHECKPOINT --out .* --stages text_encoder`"):
        build_pipeline(LoadSpec(backend="onnxruntime", onnx=partial))
