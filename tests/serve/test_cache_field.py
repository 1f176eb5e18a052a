"""The per-request step-cache field of the serving API: parsed into EditRequest.cache, refused in one 400 line."""
import pytest

from kontext_trt.core.specs import CacheSpec
from kontext_trt.serve import openai_api


def test_cache_field_becomes_the_request_cache():
    req = openai_api.parse_request({"prompt": "add a moon", "cache": "FBCache:0.2"}, None)
    assert req.cache == CacheSpec("fbcache", 0.2)
    assert openai_api.parse_request({"prompt": "add a moon"}, None).cache == CacheSpec()


def test_bad_cache_field_is_a_400_naming_it():
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.parse_request({"prompt": "add a moon", "cache": "lru:0.1"}, None)
    assert info.value.status == 400 and info.value.param == "cache"
    assert "cache 'lru:0.1' is invalid: send off, fbcache:T or teacache:T" in info.value.message


def test_server_cache_is_the_default_of_requests_without_one(tiny_pipeline):
    """serve --cache SPEC: a request without `cache` runs SPEC (its PNG metadata says so); one with cache=off does not."""
    import base64
    import io
    import json

    import httpx
    from conftest import app_in_thread
    from PIL import Image

    from kontext_trt.safety.guard import OutputPolicy

    def served_cache(url: str, **fields) -> dict:
        body = {"prompt": "a red door", "steps": 4, "size": "64x64", "seed": 3, **fields}
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        png = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        return json.loads(png.text["kontext-trt"])["cache"]

    with app_in_thread(tiny_pipeline, {}, policy=OutputPolicy(None, "none"), cache="teacache:1e+09") as url:
        assert served_cache(url) == {"spec": "teacache:1e+09", "steps_computed": 2, "steps_skipped": 2}
        assert served_cache(url, cache="off") == {"spec": "off", "steps_computed": 4, "steps_skipped": 0}


def test_serve_refuses_a_bad_cache_spec_in_one_line(capsys):
    from kontext_trt.cli.main import main

    assert main(["serve", "--cache", "fbcache:lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --cache") and "not a number" in err and err.count("\n") == 1
