"""serve's access and limit flags as ServeConfig and Settings, the access rules (Host, Origin, Bearer key), error
bodies without server paths, and the tokenizers' cut of long prompts: no server needed."""
from __future__ import annotations

import pytest

KEY = "test-key-0123456789abcdef"


def test_tokenizers_never_see_a_whole_long_prompt():
    from kontext_trt.core import text

    seen = []

    class Spy:
        def __call__(self, prompts, **kw):
            import torch

            seen.append(max(len(p) for p in prompts))
            return type("Out", (), {"input_ids": torch.zeros(len(prompts), kw.get("max_length") or 600)})()

    text.tokenize(Spy(), ["word " * 1_000_000], text.CLIP_LEN, "CLIP")
    text.tokenize(Spy(), ["word " * 1_000_000], text.T5_MAX_LEN, "T5")
    assert seen == [text.CLIP_LEN * text.MAX_CHARS_PER_TOKEN] * 2 + [text.T5_MAX_LEN * text.MAX_CHARS_PER_TOKEN] * 2
    assert text.cut("short prompt", text.CLIP_LEN) == "short prompt"


def test_the_cut_keeps_the_tokens_the_encoders_read(tiny_ckpt):
    from kontext_trt.core import checkpoint as ck
    from kontext_trt.core import text

    prompt = "make the small red house on the hill blue, add snow on its roof and a moon; " * 400  # 30 KB
    ckpt = ck.open_checkpoint(tiny_ckpt)
    for tokenizer, length in zip(ck.load_tokenizers(ckpt), (text.CLIP_LEN, ckpt.text_length)):
        whole = tokenizer([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        assert text.tokenize(tokenizer, [prompt], length, "x").tolist() == whole.input_ids.tolist()


def serve_args(*flags: str):
    from kontext_trt.cli.main import build_parser

    return build_parser().parse_args(["serve", *flags])


def test_flags_make_the_settings(tiny_ckpt, monkeypatch):
    from kontext_trt.cli.serve import serve_config

    monkeypatch.setenv("KONTEXT_TRT_API_KEY", KEY)
    config = serve_config(serve_args("--model", str(tiny_ckpt), "--max-steps", "12", "--max-pixels", "2000000",
                                     "--max-upload-mib", "3", "--max-prompt-bytes", "2048"))
    assert config.api_key == KEY and KEY not in repr(config) and KEY not in repr(config.settings())
    assert config.host_names() == ("localhost", "127.0.0.1", "::1")
    settings = config.settings()
    assert (settings.limits.max_steps, settings.limits.max_pixels, settings.limits.max_upload_bytes,
            settings.limits.max_prompt_bytes) == (12, 2_000_000, 3 * 2**20, 2048)
    assert settings.model_id == "tiny" and str(tiny_ckpt) in settings.hidden_paths
    quiet = serve_config(serve_args("--model", str(tiny_ckpt), "--max-steps", "12", "--safety-checker", "none"))
    assert quiet.service().max_steps == 12  # the service caps the model's default steps at --max-steps
    assert settings.cors_origins == () and settings.allowed_hosts == ("localhost", "127.0.0.1", "::1")
    monkeypatch.delenv("KONTEXT_TRT_API_KEY")
    assert serve_config(serve_args("--model", str(tiny_ckpt))).api_key is None
    assert serve_config(serve_args("--model", str(tiny_ckpt), "--host", "0.0.0.0")).host_names() == ()
    assert serve_config(serve_args("--model", str(tiny_ckpt), "--host", "127.0.0.2")).host_names()[-1] == "127.0.0.2"
    named = serve_config(serve_args("--model", str(tiny_ckpt), "--host", "0.0.0.0", "--allowed-hosts",
                                    "Edit.Example.com,*.corp.example:8443", "--cors-origin", "https://app.example/"))
    assert named.host_names() == ("edit.example.com", "*.corp.example:8443")
    assert named.cors_origins == ("https://app.example",)


@pytest.mark.parametrize("flags,param", [
    (("--cors-origin", "https://app.example/page"), "cors_origin"),
    (("--cors-origin", "app.example"), "cors_origin"),
    (("--api-key", " "), "api_key"),
    (("--api-key", "two words"), "api_key"),
])
def test_bad_access_flags_are_one_line(tiny_ckpt, flags, param):
    from kontext_trt.cli.serve import serve_config
    from kontext_trt.core.errors import KontextError

    with pytest.raises(KontextError) as info:
        serve_config(serve_args("--model", str(tiny_ckpt), *flags))
    assert info.value.param == param


def test_access_rules():
    from kontext_trt.serve.access import authorized, host_allowed, is_loopback, same_origin

    loopback = ("localhost", "127.0.0.1", "::1")
    assert all(host_allowed(h, loopback) for h in ("localhost:8000", "127.0.0.1", "[::1]:80", "LocalHost:1"))
    assert not any(host_allowed(h, loopback) for h in ("evil.example", "127.0.0.1.evil.example", "", None, "[::2]"))
    assert host_allowed("a.corp.example:8443", ("*.corp.example:8443",))
    assert not host_allowed("a.corp.example:80", ("*.corp.example:8443",)) and not host_allowed("corp.example",
                                                                                                 ("*.corp.example",))
    assert host_allowed("anything", ()) and host_allowed("anything", ("*",))
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000") and same_origin("https://a.example", "a.example:443")
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000") and not same_origin("null", "127.0.0.1:8000")
    assert authorized(f"Bearer {KEY}", KEY) and authorized(f"bearer  {KEY} ", KEY)
    assert not any(authorized(h, KEY) for h in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"))
    assert is_loopback("127.0.0.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")


def test_error_bodies_name_no_server_path():
    from kontext_trt.serve.openai_api import ApiError

    error = ApiError(500, "cannot open /srv/models/tiny/transformer/model.safetensors (ckpt/tiny/vae); "
                     "POST /v1/images/edits")
    message = error.body(hidden=("ckpt/tiny",))["error"]["message"]
    assert message == "cannot open model.safetensors (tiny/vae); POST /v1/images/edits"


def test_requests_without_steps_run_the_models_default_at_most_max_steps(klein_tiny_base_ckpt):
    """parse_request leaves steps to the model; the service fills the model's (klein base: 50) capped at --max-steps,
    and refuses a count sent over it."""
    from dataclasses import replace

    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.safety.guard import OutputPolicy
    from kontext_trt.serve.openai_api import ApiError, Limits, parse_request
    from kontext_trt.serve.service import EditService

    assert parse_request({"prompt": "x"}, None, Limits(max_steps=8)).steps is None
    assert parse_request({"prompt": "x", "steps": 3}, None, Limits(max_steps=8)).steps == 3
    with pytest.raises(ApiError, match="steps 9 is over this server's limit: send 1 to 8"):
        parse_request({"prompt": "x", "steps": 9}, None, Limits(max_steps=8))
    k = build_pipeline(LoadSpec(klein_tiny_base_ckpt, dtype="fp32"))
    capped, free = (EditService(lambda: k, policy=OutputPolicy(None, "none"), max_steps=m) for m in (8, None))
    capped.k = free.k = k  # with_defaults reads the loaded pipeline only
    req = parse_request({"prompt": "x"}, None, Limits(max_steps=8))
    assert (capped.with_defaults(req).steps, free.with_defaults(req).steps) == (8, 50)
    assert capped.with_defaults(replace(req, steps=3)).steps == 3 and capped.with_defaults(req).guidance == 4.0
