"""--stages takes one form on export and build: names separated by commas or spaces, unknown names refused."""
import pytest

from kontext_trt.cli.main import build_parser
from kontext_trt.core.errors import KontextError
from kontext_trt.core.stages import stage_list


def test_commas_spaces_and_duplicates():
    assert stage_list(["clip,t5", "transformer_head", "clip"]) == ("clip", "t5", "transformer_head")
    assert stage_list(["vae_decoder, vae_encoder,"]) == ("vae_decoder", "vae_encoder")


def test_unknown_stage_is_one_line():
    with pytest.raises(KontextError, match="--stages: unknown stage 'vae': use any of clip,t5,vae_encoder,"):
        stage_list(["clip,vae"])


@pytest.mark.parametrize("command", [["export", "--model", "m", "--out", "o"], ["build", "--onnx", "o", "--out", "e"]])
def test_export_and_build_parse_both_forms_alike(command):
    parser = build_parser()
    commas = parser.parse_args([*command, "--stages", "clip,transformer_body"]).stages
    spaces = parser.parse_args([*command, "--stages", "clip", "transformer_body"]).stages
    assert stage_list(commas) == stage_list(spaces) == ("clip", "transformer_body")
