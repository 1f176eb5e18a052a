"""Field errors in OpenAI's shape: a 400 whose body names the request field at fault (param) and a code, from
parse_request, through the real app (form and JSON), for a request that fails while it runs, and the serve CLI's own
missing --model as one `error:` line."""
from __future__ import annotations

import io
import json
import math

import httpx
import pytest
from PIL import Image

from kontext_trt.safety.guard import OutputPolicy
from kontext_trt.serve import openai_api

# field -> (sent value, param, code, message fragment in the API's words)
FIELD_ERRORS = {
    "steps": ("0", "steps", "out_of_range", "steps must be at least 1, got 0"),
    "seed": ("-3", "seed", "out_of_range", "seed -3 is outside 0..18446744073709551615"),
    "guidance": ("nan", "guidance", "invalid_value", "guidance nan is not a finite number"),
    "true_cfg": ("7", "true_cfg", "invalid_value", "true_cfg 7.0 needs a negative_prompt to push away from"),
}


@pytest.mark.parametrize("fields,param,code,message", [
    *[({name: value}, param, code, message) for name, (value, param, code, message) in FIELD_ERRORS.items()],
    ({"seed": 2**64}, "seed", "out_of_range", "seed 18446744073709551616 is outside"),
    ({"true_cfg": "inf", "negative_prompt": "blur"}, "true_cfg", "invalid_value", "true_cfg inf is not a finite"),
    ({"negative_prompt": "\udcff", "true_cfg": 2}, "negative_prompt", "invalid_value", "negative_prompt is not valid"),
    ({"guidance": "abc"}, "guidance", "invalid_value", "guidance 'abc' is invalid: send a number like 2.5"),
    ({"steps": 2.5}, "steps", "invalid_value", "steps 2.5 is invalid"),
    ({"n": "11"}, "n", "out_of_range", "n '11' must be an integer from 1 to 10"),
    ({"n": "two"}, "n", "invalid_value", "n 'two' must be an integer"),
    ({"size": "big"}, "size", "invalid_value", "size 'big' is not WIDTHxHEIGHT"),
    ({"size": "100x64"}, "size", "invalid_value", "width 100 is not a multiple of 16"),
    ({"size": "4096x64"}, "size", "out_of_range", "width 4096 is out of range"),
    ({"colour": "red"}, "colour", "unknown_parameter", "unrecognized field 'colour'"),
    ({"prompt": " "}, "prompt", "missing_argument", "prompt is missing"),
    ({"response_format": "url"}, "response_format", "unsupported_value", "response_format url is not offered"),
    ({"output_format": "gif"}, "output_format", "unsupported_format", "output_format 'gif' is not offered: send png, "
     "jpeg or webp"),
    ({"cache": "lru:0.1"}, "cache", "invalid_value", "cache 'lru:0.1' is invalid: send off, fbcache:T"),
    ({"cache": "fbcache:-1"}, "cache", "out_of_range", "cache 'fbcache:-1' is invalid"),
])
def test_parse_request_names_the_field_and_a_code(fields, param, code, message):
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.parse_request({"prompt": "add a moon", **fields}, None)
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, code)
    assert message in error.message and "--" not in error.message, error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": code}}


def test_an_unreadable_image_is_the_image_field():
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.read_image(b"not an image")
    assert (info.value.param, info.value.code) == ("image", "unsupported_format")


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"], body
    return body["error"]


def test_field_errors_through_the_app(app_server, tiny_pipeline, sample_png):
    """The real FastAPI app over the tiny pipeline (no safety checker: these requests are refused before it): each
    field error as a form field of an edit and as a JSON number of a generation."""
    png = ("in.png", sample_png.read_bytes(), "image/png")
    with app_server(tiny_pipeline, {}, policy=OutputPolicy(None, "none")) as url:
        for name, (value, param, code, message) in FIELD_ERRORS.items():
            edit = httpx.post(f"{url}/v1/images/edits", data={"prompt": "add a moon", "steps": "2", name: value},
                              files={"image": png}, timeout=60)
            error = error_of(edit)
            assert (error["param"], error["code"]) == (param, code) and message in error["message"], error
            number = {"steps": 0, "seed": -3, "guidance": math.nan, "true_cfg": 7}[name]  # NaN as Python writes it
            body = json.dumps({"prompt": "a red door", "size": "64x64", name: number})
            generation = httpx.post(f"{url}/v1/images/generations", content=body, timeout=60,
                                    headers={"content-type": "application/json"})
            error = error_of(generation)
            assert (error["param"], error["code"]) == (param, code) and message in error["message"], error


def test_app_and_run_time_errors_name_their_field(app_server, tiny_pipeline, sample_png):
    png = ("in.png", sample_png.read_bytes(), "image/png")
    with app_server(tiny_pipeline, {}, policy=OutputPolicy(None, "none")) as url:
        error = error_of(httpx.post(f"{url}/v1/images/edits", data={"prompt": "x"}, timeout=60))
        assert (error["param"], error["code"]) == ("image", "missing_argument")
        error = error_of(httpx.post(f"{url}/v1/images/edits", data={"prompt": "x"}, timeout=60,
                                    files=[("image", png), ("image", png)]))
        assert (error["param"], error["code"]) == ("image", "invalid_value")
        error = error_of(httpx.post(f"{url}/v1/images/edits", data={"prompt": "x"}, timeout=60,
                                    files={"image": png, "mask": png}))
        assert (error["param"], error["code"]) == ("mask", "unsupported_parameter")
        # what size an image may be at its own size is the model family's to say (FLUX.1: 64..2048 a side), at admission
        tiny = io.BytesIO()
        Image.new("RGB", (8, 8)).save(tiny, format="PNG")
        error = error_of(httpx.post(f"{url}/v1/images/edits", data={"prompt": "x", "auto_resize": "false"}, timeout=60,
                                    files={"image": ("tiny.png", tiny.getvalue(), "image/png")}))
        assert (error["param"], error["code"]) == ("image", "out_of_range")
        assert "auto_resize=false needs 64 to 2048 pixels a side" in error["message"]
        error = error_of(httpx.post(f"{url}/v1/images/generations", content=b"{not json", timeout=60,
                                    headers={"content-type": "application/json"}))
        assert (error["param"], error["code"]) == (None, "invalid_body")
        # the LoRA set is resolved when the request runs (model thread): its KontextError is a 400 naming `lora`
        error = error_of(httpx.post(f"{url}/v1/images/generations", timeout=60,
                                    json={"prompt": "a red door", "size": "64x64", "steps": 1, "lora": "style"}))
        assert (error["param"], error["code"]) == ("lora", "unsupported_parameter")
        assert "this server has no LoRAs: start it with --lora-dir DIR" in error["message"]  # a server flag stays


def test_serve_without_a_model_is_one_line_and_exit_2(capsys, monkeypatch):
    from kontext_trt.cli.main import main
    from kontext_trt.serve import server

    def never(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(server, "run_local", never)
    assert main(["serve"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and err.endswith("\n") and err.count("error:") == 1, err
    assert lines[0].startswith("error: serve needs a model: pass --model CHECKPOINT_DIR"), err
