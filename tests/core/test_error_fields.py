"""Core checks name the request field at fault (param) and a stable code, with their one-line messages unchanged."""
from __future__ import annotations

import math

import pytest

from kontext_trt.core import checks
from kontext_trt.core import image as im
from kontext_trt.core.checkpoint import open_checkpoint
from kontext_trt.core.errors import KontextError, WriteError, flag_param
from kontext_trt.core.specs import parse_cache


def fields(call) -> tuple[str | None, str, str]:
    """(param, code, message) of the KontextError `call` raises."""
    with pytest.raises(KontextError) as info:
        call()
    error = info.value
    assert error.message == str(error) and "\n" not in error.message
    return error.param, error.code, error.message


@pytest.mark.parametrize("flag,param", [("--true-cfg", "true_cfg"), ("--seed", "seed"), ("--out", "out"),
                                        ("--negative-prompt", "negative_prompt"), ("output folder", None)])
def test_flag_param(flag, param):
    assert flag_param(flag) == param
    assert flag_param("output folder", "out") == "out"


@pytest.mark.parametrize("call,param,code,message", [
    (lambda: checks.check_finite("--guidance", math.nan), "guidance", "invalid_value",
     "--guidance nan is not a finite number"),
    (lambda: checks.check_finite("--true-cfg", math.inf), "true_cfg", "invalid_value",
     "--true-cfg inf is not a finite"),
    (lambda: checks.check_seed(-3), "seed", "out_of_range", "--seed -3 is outside 0..18446744073709551615"),
    (lambda: checks.check_seed(2**64), "seed", "out_of_range", f"--seed {2**64} is outside"),
    (lambda: checks.check_text("--negative-prompt", "caf\udce9"), "negative_prompt", "invalid_value",
     "--negative-prompt is not valid UTF-8 text (byte 0xe9) at character 3"),
    (lambda: checks.check_text("--prompt", "\udcff"), "prompt", "invalid_value", "--prompt is not valid UTF-8"),
    (lambda: checks.check_device("tpu"), "device", "invalid_value", "--device tpu: kontext-trt runs on cpu or cuda"),
    (lambda: im.check_size(100, 64), "width", "invalid_value", "width 100 is not a multiple of 16: use 96 or 112"),
    (lambda: im.check_size(64, 4096), "height", "out_of_range", "height 4096 is out of range: use a value from 64"),
    (lambda: im.parse_size("big"), "size", "invalid_value", "size 'big' is not WIDTHxHEIGHT"),
    (lambda: im.parse_size("32x64"), "width", "out_of_range", "width 32 is out of range"),
    (lambda: im.check_context_size(1, 1, auto_resize=False), "image", "out_of_range",
     "the input image is 1x1: too small to edit at its own size"),
    (lambda: parse_cache("lru:0.1"), "cache", "invalid_value", "--cache 'lru:0.1': unknown policy 'lru'"),
    (lambda: parse_cache("off:1"), "cache", "invalid_value", "off takes no threshold or options"),
    (lambda: parse_cache("fbcache:lots"), "cache", "invalid_value", "not a number where one belongs"),
    (lambda: parse_cache("teacache:0.4,warp=2"), "cache", "invalid_value", "unknown option 'warp'"),
    (lambda: parse_cache("fbcache:-1"), "cache", "out_of_range", "the threshold must be >= 0"),
])
def test_value_checks_name_their_field(call, param, code, message):
    got_param, got_code, text = fields(call)
    assert (got_param, got_code) == (param, code) and message in text, text


def test_output_checks_name_out(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (lambda: checks.check_output_file(tmp_path), "invalid_value", "is a folder: give a file name"),
        (lambda: checks.check_output_file(tmp_path / "o.gif"), "unsupported_format", "the image format comes from"),
        (lambda: checks.check_output_file(tmp_path / "missing" / "o.png"), "not_found", "does not exist"),
        (lambda: checks.check_output_file("/sys/o.png"), "not_writable", "/sys/o.png cannot be written"),
        (lambda: checks.check_output_folder(tmp_path / "file.txt"), "invalid_value", "is a file, not a folder"),
        (lambda: checks.check_output_folder(tmp_path / "file.txt" / "sub"), "invalid_value", "is a file, not a"),
        (lambda: checks.check_output_folder(tmp_path / "file.txt", "output folder"), "invalid_value",
         f"output folder {tmp_path / 'file.txt'} is a file"),
    ]
    for call, code, message in cases:
        param, got, text = fields(call)
        assert (param, got) == ("out", code) and message in text, text
    assert fields(lambda: checks.check_output_file(tmp_path / "o.gif", "--report"))[0] == "report"


def test_image_loading_codes(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\x00" * 10)
    assert fields(lambda: im.load_image(tmp_path / "none.png"))[:2] == ("image", "not_found")
    param, code, message = fields(lambda: im.load_image(tmp_path / "bad.jpg"))
    assert (param, code) == ("image", "unsupported_format") and "bad.jpg is unreadable" in message


def test_checkpoint_errors_name_model(tmp_path, tiny_ckpt):
    assert fields(lambda: open_checkpoint(tmp_path / "none"))[:2] == ("model", "not_found")
    assert fields(lambda: open_checkpoint("black-forest-labs/FLUX.1-Kontext-dev"))[:2] == ("model", "not_found")
    (tmp_path / "file").write_text("x")
    assert fields(lambda: open_checkpoint(tmp_path / "file"))[:2] == ("model", "invalid_value")
    assert fields(lambda: open_checkpoint(tmp_path))[:2] == ("model", "invalid_value")  # neither layout
    import shutil
    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    (broken / "vae" / "config.json").unlink()
    param, code, message = fields(lambda: open_checkpoint(broken))
    assert (param, code) == ("model", "not_found") and "vae/config.json: missing" in message


def test_write_error_is_exit_1_with_a_code():
    error = WriteError("writing o.png failed: No space left on device (ENOSPC)")
    assert (error.exit_code, error.param, error.code) == (1, "out", "write_failed")
    assert KontextError("x").code == "invalid_value" and KontextError("x").param is None
