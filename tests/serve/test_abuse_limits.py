"""Abuse suite (limits, access, OpenAI conventions) against a real `kontext-trt serve` process on loopback: each case
asserts the status, the error's param and code, a time bound and, for the big cases (pixels, uploads, prompts), the
server's peak memory; the server still answers a normal edit afterwards. One server with --api-key and small limits
for the module; the package's keyless `served` server for the defaults (no CORS, loopback Host names)."""
from __future__ import annotations

import base64
import io
import json
import re
import time
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from conftest import server_process
from limits_helpers import (
    CHROMIUM,
    EDIT,
    FAST_S,
    KEY,
    MEMORY_MB,
    Memory,
    assert_alive,
    chromium_dom,
    decode,
    edit,
    error_of,
    jpeg_claiming,
    metric,
    multipart,
    png_of_size,
    post,
    raw_upload,
)
from PIL import Image

AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED_ORIGIN = "http://allowed.example"
MAX_STEPS, MAX_PIXELS, MAX_UPLOAD_MIB, MAX_PROMPT_BYTES = 8, 1_000_000, 1, 1024


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, c2pa_chain, tmp_path_factory):
    """The tiny model behind --api-key, small limits, one CORS origin, C2PA signing; TMPDIR its own folder (nothing
    may be spooled there: server.tmp)."""
    chain, key = c2pa_chain
    server_tmp = tmp_path_factory.mktemp("server-tmp")
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--max-batch", "2", "--batch-window-ms", "200",
                        "--safety-checker", "none", "--c2pa-cert", str(chain), "--c2pa-key", str(key),
                        "--max-steps", str(MAX_STEPS), "--max-pixels", str(MAX_PIXELS),
                        "--max-upload-mib", str(MAX_UPLOAD_MIB), "--max-prompt-bytes", str(MAX_PROMPT_BYTES),
                        "--cors-origin", ALLOWED_ORIGIN, env={"KONTEXT_TRT_API_KEY": KEY, "TMPDIR": str(server_tmp)},
                        ) as server:
        server.tmp = server_tmp
        yield server


@pytest.fixture
def png(sample_png) -> bytes:
    return sample_png.read_bytes()


# --- access -------------------------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_healthz_and_the_page(guarded):
    url = guarded.url
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
        start = time.perf_counter()
        response = httpx.get(f"{url}{path}", timeout=30)
        error_of(response, 401, "Authorization", "invalid_api_key", elapsed=time.perf_counter() - start)
        assert response.headers["www-authenticate"] == "Bearer"
    for key in ("wrong", KEY[:-1], KEY + "x", ""):
        response, elapsed = post(url, "/v1/images/generations", key=key, json={"prompt": "x", "size": "64x64"})
        error_of(response, 401, "Authorization", "invalid_api_key", elapsed=elapsed)
    response, _ = post(url, "/v1/images/generations", key=None, headers={"Authorization": f"Basic {KEY}"},
                       json={"prompt": "x", "size": "64x64"})
    error_of(response, 401, "Authorization", "invalid_api_key")
    assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    assert "<title>kontext-trt" in httpx.get(f"{url}/", timeout=10).text
    assert httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).status_code == 200


def test_models_lists_the_served_checkpoint(guarded, tiny_ckpt):
    body = httpx.get(f"{guarded.url}/v1/models", headers=AUTH, timeout=10).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == tiny_ckpt.name == "tiny" and card["object"] == "model"
    assert card["owned_by"] == "kontext-trt" and abs(card["created"] - time.time()) < 3600
    assert httpx.get(f"{guarded.url}/v1/models/tiny", headers=AUTH, timeout=10).json() == card
    error_of(httpx.get(f"{guarded.url}/v1/models/dall-e-2", headers=AUTH, timeout=10), 404, "model",
             "model_not_found")


@pytest.mark.parametrize("server", ["guarded", "served"])
def test_foreign_host_headers_are_refused(request, server):
    url = request.getfixturevalue(server).url
    port = url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost.:{port}"):
        start = time.perf_counter()
        response = httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": host}, timeout=10)
        error_of(response, 400, "Host", "invalid_host", elapsed=time.perf_counter() - start)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": host}, timeout=10).status_code == 200


def test_cross_origin_posts_are_refused_and_cors_is_only_for_its_origin(guarded, served, png):
    for url in (guarded.url, served.url):
        response, elapsed = edit(url, png, EDIT, headers={"Origin": "http://evil.example"})
        error_of(response, 403, "Origin", "forbidden_origin", elapsed=elapsed)
        response, _ = edit(url, png, EDIT, headers={"Origin": "null"})
        error_of(response, 403, "Origin", "forbidden_origin")
        assert "access-control-allow-origin" not in response.headers
    # the page's own origin (same host and port) passes, as the browser page sends it
    response, _ = edit(guarded.url, png, EDIT, headers={"Origin": guarded.url})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    response, _ = edit(guarded.url, png, EDIT, headers={"Origin": ALLOWED_ORIGIN})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{guarded.url}/v1/images/edits", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    for url in (guarded.url, served.url):  # CORS off without --cors-origin, and for any other origin
        denied = httpx.options(f"{url}/v1/images/edits", headers={"Origin": "http://evil.example", **preflight})
        assert denied.status_code >= 400 and "access-control-allow-origin" not in denied.headers
        got = httpx.get(f"{url}/v1/models", headers={**AUTH, "Origin": "http://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in got.headers


def test_openai_sdk_with_an_api_key(guarded, png):
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=f"{guarded.url}/v1", max_retries=0, timeout=120)
    edited = client.images.edit(image=("in.png", png, "image/png"), prompt="add a moon",
                                extra_body={"steps": 2, "auto_resize": "false", "seed": 4})
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (96, 64)
    made = client.images.generate(prompt="a red door", size="64x64", n=2, extra_body={"steps": 1, "seed": 5})
    seeds = [json.loads(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).text["kontext-trt"])["seed"]
             for d in made.data]
    assert seeds == [5, 6]
    assert [m.id for m in client.models.list()] == ["tiny"]
    wrong = openai.OpenAI(api_key="sk-wrong", base_url=f"{guarded.url}/v1", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.images.generate(prompt="a red door", size="64x64")
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.images.edit(image=("in.png", png, "image/png"), prompt="add a moon")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a red door", size="64x64", extra_body={"steps": 250000})
    assert info.value.param == "steps" and info.value.code == "out_of_range"


# --- limits -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,param,code,message", [
    ({"steps": str(MAX_STEPS + 1)}, "steps", "out_of_range", f"send 1 to {MAX_STEPS}"),
    ({"steps": "250000"}, "steps", "out_of_range", "over this server's limit"),
    ({"steps": "1e400"}, "steps", "invalid_value", "steps '1e400' is invalid"),
    ({"guidance": "1e308"}, "guidance", "out_of_range", "guidance 1e+308 is out of range: send a number from 0 to 20"),
    ({"guidance": "-1"}, "guidance", "out_of_range", "out of range"),
    ({"guidance": "inf"}, "guidance", "invalid_value", "not a finite number"),
    ({"true_cfg": "50", "negative_prompt": "blur"}, "true_cfg", "out_of_range", "from 1 to 20"),
    ({"true_cfg": "0.5"}, "true_cfg", "out_of_range", "from 1 to 20"),
    ({"seed": "-1"}, "seed", "out_of_range", "outside 0..18446744073709551615"),
    ({"seed": str(2**64)}, "seed", "out_of_range", "outside 0.."),
    ({"n": "0"}, "n", "out_of_range", "from 1 to 10"),
    ({"n": "11"}, "n", "out_of_range", "from 1 to 10"),
    ({"output_compression": "101"}, "output_compression", "out_of_range", "from 0 to 100"),
    ({"output_compression": "-1"}, "output_compression", "out_of_range", "from 0 to 100"),
    ({"output_compression": "high"}, "output_compression", "invalid_value", "from 0 to 100"),
    ({"output_format": "gif"}, "output_format", "unsupported_format", "send png, jpeg or webp"),
    ({"lora": "x" * 5000}, "lora", "string_above_max_length", "lora 'xxxx"),
    ({"lora": "../../etc/passwd"}, "lora", "invalid_value", "LoRA names"),
    ({"lora": "/etc/passwd:0.5"}, "lora", "invalid_value", "LoRA names"),
    ({"lora": "style:1e9"}, "lora", "invalid_value", "scales within"),
    ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, "prompt", "string_above_max_length", f"at most {MAX_PROMPT_BYTES}"),
    ({"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, "prompt", "string_above_max_length", "bytes"),
    ({"negative_prompt": "x" * (MAX_PROMPT_BYTES + 1), "true_cfg": "2"}, "negative_prompt",
     "string_above_max_length", "at most"),
])
def test_out_of_range_fields_are_400s(guarded, png, fields, param, code, message):
    response, elapsed = edit(guarded.url, png, {**EDIT, **fields})
    error = error_of(response, 400, param, code, elapsed=elapsed)
    assert message in error["message"] and len(error["message"]) < 400, error


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "x", "guidance": 1e308}, "guidance", "out_of_range"),
    ({"prompt": "x", "steps": 1e308}, "steps", "out_of_range"),
    ({"prompt": "x", "steps": 250000}, "steps", "out_of_range"),
    ({"prompt": ["a", "b"]}, "prompt", "invalid_type"),
    ({"prompt": {"text": "x"}}, "prompt", "invalid_type"),
    ({"prompt": "x", "n": {"a": 1}}, "n", "invalid_value"),
    ({"prompt": "x", "n": True}, "n", "invalid_value"),
    ({"prompt": "x", "seed": [1]}, "seed", "invalid_value"),
    ({"prompt": "x", "size": [64, 64]}, "size", "invalid_value"),
    ({"prompt": "x", "lora": "y" * 5000}, "lora", "string_above_max_length"),
    ({"prompt": "x", "cache": {"kind": "fbcache"}}, "cache", "invalid_value"),
    ({"prompt": "x", "output_format": ["png"]}, "output_format", "unsupported_format"),
    ({"prompt": "x", "extra": {"deep": [[[1]]]}}, "extra", "unknown_parameter"),
])
def test_wrong_types_in_json_are_400s(guarded, body, param, code):
    response, elapsed = post(guarded.url, "/v1/images/generations", json={"size": "64x64", **body})
    error_of(response, 400, param, code, elapsed=elapsed)


def test_malformed_bodies_are_400s_never_500s(guarded, png):
    url = guarded.url
    json_bodies = [b"[" * 100_000 + b"]" * 100_000, b"{" * 50_000, b"[1, 2]", b'"prompt"', b"null", b"{not json",
                   b'{"prompt": "\xff\xfe"}', b""]
    for body in json_bodies:
        response, elapsed = post(url, "/v1/images/generations", content=body,
                                 headers={"Content-Type": "application/json"})
        error_of(response, 400, None, "invalid_body", elapsed=elapsed)
    cases = [  # (request kwargs, param, code)
        (dict(json={"prompt": "x"}), "image", "missing_argument"),  # a JSON edit without images
        (dict(content=b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx",
              headers={"Content-Type": "multipart/form-data"}), None, "invalid_body"),  # no boundary
        (dict(content=b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx",
              headers={"Content-Type": "multipart/form-data; boundary=b"}), None, "invalid_body"),  # ends early
        (dict(data={"prompt": "x", "image": "not a file"}), "image", "invalid_type"),
        (dict(data={"prompt": "x"}), "image", "missing_argument"),
        (dict(data=EDIT, files=[("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]),
         "image", "invalid_value"),
        (dict(data={**EDIT, "mask": "x"}, files={"image": ("a.png", png, "image/png")}), "mask",
         "unsupported_parameter"),
        (dict(data=EDIT, files={"image": ("a.png", b"", "image/png")}), "image", "invalid_value"),
        (dict(data=EDIT, files={"image": ("a.png", png[:200], "image/png")}), "image", "invalid_value"),
    ]
    for kwargs, param, code in cases:
        response, elapsed = post(url, "/v1/images/edits", **kwargs)
        error_of(response, 400, param, code, elapsed=elapsed)
    assert_alive(url, png)



def test_invalid_utf8_fields_are_400s_not_latin1(guarded, png):
    png_part = (b"image\"; filename=\"in.png", png)
    for fields, param in (([(b"prompt", b"add a \xff moon")] , "prompt"), ([(b"prompt", b"\xc3\x28")], "prompt"),
                          ([(b"prompt", b"x"), (b"negative_prompt", b"\xed\xa0\x80")], "negative_prompt"),
                          ([(b"prompt", b"x"), (b"\xff\xfe", b"1")], None)):
        body, headers = multipart([*fields, png_part])
        response, elapsed = post(guarded.url, "/v1/images/edits", content=body, headers=headers)
        error = error_of(response, 400, param, "invalid_value", elapsed=elapsed)
        assert "not valid UTF-8" in error["message"]
    response, _ = post(guarded.url, "/v1/images/edits", content=b"prompt=%FFx",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    error_of(response, 400, None, "invalid_value")
    body, headers = multipart([(b"prompt", "add a moon, café".encode()), (b"steps", b"2"), (b"auto_resize", b"false"),
                               png_part])
    response, _ = post(guarded.url, "/v1/images/edits", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert json.loads(decode(response)[0].text["kontext-trt"])["prompt"] == "add a moon, café"



@pytest.fixture(scope="module")
def huge_png() -> bytes:
    data = png_of_size(12000, 12000)
    assert len(data) < 300_000  # 144 million pixels in a few hundred KB
    return data


def test_huge_images_are_refused_from_their_header(guarded, png, huge_png):
    with Memory(guarded.proc.pid) as memory:
        response, elapsed = edit(guarded.url, huge_png, EDIT)
        error = error_of(response, 400, "image", "out_of_range", elapsed=elapsed)
        assert "12000x12000" in error["message"] and f"at most {MAX_PIXELS:,}" in error["message"]
        for claimed in ((12000, 12000), (30000, 30000)):  # the second is past Pillow's own bomb limit
            response, elapsed = edit(guarded.url, jpeg_claiming(*claimed), EDIT)
            error_of(response, 400, "image", "out_of_range", elapsed=elapsed)
        response, elapsed = edit(guarded.url, png_of_size(1001, 1000), EDIT)  # just over 1 MP
        error_of(response, 400, "image", "out_of_range", elapsed=elapsed)
    assert memory.grew_mb < MEMORY_MB, f"+{memory.grew_mb:.0f} MB"
    assert_alive(guarded.url, png)


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "BMP", "ICO", "PPM", "EPS"])
def test_only_png_jpeg_and_webp_are_decoded(guarded, fmt):
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    buffer = io.BytesIO()
    if fmt == "EPS":
        buffer.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 96 64\n%%EndComments\nshowpage\n%%EOF\n")
    else:
        image.save(buffer, format=fmt)
    response, elapsed = edit(guarded.url, buffer.getvalue(), EDIT)
    error = error_of(response, 400, "image", "unsupported_format", elapsed=elapsed)
    assert "not a readable PNG, JPEG or WebP file" in error["message"]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_inputs_are_edited(guarded, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(buffer, format=fmt)
    response, _ = edit(guarded.url, buffer.getvalue(), EDIT)
    assert response.status_code == 200, response.text


def test_long_prompts_are_refused_before_the_tokenizer(guarded, png):
    with Memory(guarded.proc.pid) as memory:
        response, elapsed = edit(guarded.url, png, {**EDIT, "prompt": "a" * 500_000})  # a form field: read-time cap
        error_of(response, 400, "prompt", "string_above_max_length", elapsed=elapsed)
        response, elapsed = edit(guarded.url, png, {**EDIT, "prompt": "a" * 4_000_000})  # over the body cap
        error_of(response, 413, "image", "file_too_large", elapsed=elapsed)
        response, elapsed = post(guarded.url, "/v1/images/generations", json={"prompt": "a " * 2_000_000})
        error_of(response, 413, None, "request_too_large", elapsed=elapsed)
        response, elapsed = post(guarded.url, "/v1/images/generations", json={"prompt": "a" * 60_000})
        error_of(response, 400, "prompt", "string_above_max_length", elapsed=elapsed)
    assert memory.grew_mb < MEMORY_MB, f"+{memory.grew_mb:.0f} MB"
    # a prompt under the byte cap but over the encoders' token limits runs (truncated to 77 / the model's T5 tokens)
    response, _ = edit(guarded.url, png, {**EDIT, "prompt": ("paint it red " * 200)[:MAX_PROMPT_BYTES]})
    assert response.status_code == 200, response.text[:300]



def test_uploads_over_the_cap_are_413_while_reading(guarded, png):
    big = png + b"\0" * (MAX_UPLOAD_MIB * 2**20)  # just over the cap
    with Memory(guarded.proc.pid) as memory:
        response, elapsed = edit(guarded.url, big, EDIT)
        error = error_of(response, 413, "image", "file_too_large", elapsed=elapsed)
        assert f"{MAX_UPLOAD_MIB} MiB" in error["message"]
        # a declared 1 GiB body: refused from its Content-Length before a byte of it is read
        status, elapsed, sent = raw_upload(guarded.port, declared=2**30, total=2**30)
        assert status == 413 and elapsed < FAST_S and sent < 64 * 2**20, (status, elapsed, sent)
        # a chunked body with no length: refused once the image part passes the cap, the rest never read
        status, elapsed, sent = raw_upload(guarded.port, declared=None, total=2**30)
        assert status == 413 and elapsed < FAST_S and sent < 64 * 2**20, (status, elapsed, sent)
    assert memory.grew_mb < MEMORY_MB, f"+{memory.grew_mb:.0f} MB"
    assert list(guarded.tmp.iterdir()) == []  # nothing spooled to disk
    assert_alive(guarded.url, png)



# --- OpenAI conventions -------------------------------------------------------------------------------------------



def test_n_splits_across_batches_with_seed_plus_i(guarded, png):
    before = httpx.get(f"{guarded.url}/metrics", headers=AUTH, timeout=10).text
    response, _ = edit(guarded.url, png, {**EDIT, "n": "5", "seed": "7"})
    assert response.status_code == 200, response.text[:300]
    assert int(response.headers["x-batch-size"]) <= 2  # --max-batch 2
    images = decode(response)
    assert len(images) == 5
    assert [json.loads(img.text["kontext-trt"])["seed"] for img in images] == [7, 8, 9, 10, 11]
    after = httpx.get(f"{guarded.url}/metrics", headers=AUTH, timeout=10).text
    assert metric(after, "kontext_batch_size_sum") - metric(before, "kontext_batch_size_sum") == 5
    assert metric(after, "kontext_batch_size_count") - metric(before, "kontext_batch_size_count") >= 3
    alone, _ = edit(guarded.url, png, {**EDIT, "seed": "10"})  # image 3 is the request with seed 10
    pixels = [np.asarray(img.convert("RGB"), np.int16) for img in (decode(alone)[0], images[3])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    response, _ = post(guarded.url, "/v1/images/generations",
                       json={"prompt": "a red door", "size": "64x64", "steps": 1, "n": 2, "seed": 2**64 - 1})
    assert [json.loads(img.text["kontext-trt"])["seed"] for img in decode(response)] == [2**64 - 1, 0]


@pytest.mark.parametrize("fmt,magic,mime", [("png", b"\x89PNG", "image/png"), ("jpeg", b"\xff\xd8", "image/jpeg"),
                                           ("webp", b"RIFF", "image/webp")])
def test_output_formats_carry_metadata_and_c2pa(guarded, fmt, magic, mime):
    import c2pa

    sizes = {}
    for quality in ("10", "95"):
        response, _ = post(guarded.url, "/v1/images/generations",
                           json={"prompt": "a red door", "size": "256x256", "steps": 1, "seed": 3,
                                 "output_format": fmt, "output_compression": quality})
        assert response.status_code == 200, response.text[:300]
        assert response.json()["output_format"] == fmt
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert data.startswith(magic)
        sizes[quality] = len(data)
        img = Image.open(io.BytesIO(data))
        meta = json.loads(img.text["kontext-trt"] if fmt == "png" else img.getexif()[0x010E])
        assert meta["seed"] == 3 and meta["prompt"] == "a red door"
        with c2pa.Reader(mime, io.BytesIO(data)) as reader:
            assert reader.get_active_manifest() is not None
    if fmt != "png":
        assert sizes["10"] < sizes["95"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_page_sends_the_api_key(guarded, tmp_path):
    """The page (served without a key) edits with the key given once as #key=...: same-origin POSTs pass the Origin
    check; without the key it shows the 401's message."""
    query = urlencode({"sample": 1, "prompt": "add a moon", "steps": 2, "auto_resize": "false", "run": 1})
    for name, fragment, expected in (("key", f"#key={KEY}", "done (batch of 1)"), ("nokey", "", "no API key given")):
        dom = chromium_dom(f"{guarded.url}/?{query}{fragment}", tmp_path / name)
        assert expected in dom, dom[-3000:]
        if name == "key":
            assert re.search(r'<img id="output"[^>]*src="data:image/png;base64,', dom)


def test_server_still_edits_after_the_abuse(guarded, png):
    assert_alive(guarded.url, png)
    assert guarded.proc.poll() is None
