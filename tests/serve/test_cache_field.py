"""The per-request step-cache field of the serving API: parsed into EditRequest.cache, refused in one 400 line."""
import pytest

from kontext_trt.serve import openai_api


def test_cache_field_becomes_the_request_cache():
    req = openai_api.parse_request({"prompt": "add a moon", "cache": "FBCache:0.2"}, None)
    assert req.cache == "fbcache:0.2"
    assert openai_api.parse_request({"prompt": "add a moon"}, None).cache == "off"


def test_bad_cache_field_is_a_400_naming_it():
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.parse_request({"prompt": "add a moon", "cache": "lru:0.1"}, None)
    assert info.value.status == 400 and info.value.param == "cache"
    assert "cache 'lru:0.1' is invalid: send off, fbcache:T or teacache:T" in info.value.message
