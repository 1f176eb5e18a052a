"""Abuse suite (limits, access, OpenAI conventions) against a real `kontext-trt serve` process on loopback: each case
asserts the status, the error's param and code, a time bound and, for the big cases (pixels, uploads, prompts), the
server's peak memory; the server still answers a normal edit afterwards. One server with --api-key and small limits
for the module; the package's keyless `served` server for the defaults (no CORS, loopback Host names)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from conftest import server_process
from PIL import Image

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED_ORIGIN = "http://allowed.example"
MAX_STEPS, MAX_PIXELS, MAX_UPLOAD_MIB, MAX_PROMPT_BYTES = 8, 1_000_000, 1, 1024
EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false", "seed": "4"}
FAST_S = 5.0  # a refusal on a loaded 2-core machine: milliseconds; the old unbounded paths took 3 to 13 s
MEMORY_MB = 300


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, c2pa_chain, server_tmp):
    """The tiny model behind --api-key, small limits, one CORS origin, C2PA signing; TMPDIR its own folder (nothing
    may be spooled there)."""
    chain, key = c2pa_chain
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--max-batch", "2", "--batch-window-ms", "200",
                        "--safety-checker", "none", "--c2pa-cert", str(chain), "--c2pa-key", str(key),
                        "--max-steps", str(MAX_STEPS), "--max-pixels", str(MAX_PIXELS),
                        "--max-upload-mib", str(MAX_UPLOAD_MIB), "--max-prompt-bytes", str(MAX_PROMPT_BYTES),
                        "--cors-origin", ALLOWED_ORIGIN, env={"KONTEXT_TRT_API_KEY": KEY, "TMPDIR": str(server_tmp)},
                        ) as server:
        yield server


@pytest.fixture(scope="module")
def png(sample_png_bytes) -> bytes:
    return sample_png_bytes


@pytest.fixture(scope="module")
def sample_png_bytes() -> bytes:
    from kontext_trt.core import image as im

    buffer = io.BytesIO()
    im.sample_image(96, 64).save(buffer, format="PNG")
    return buffer.getvalue()


def status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


class Memory:
    """The server's peak RSS over a block, above its RSS before (the peak is reset through clear_refs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "Memory":
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.field = "VmHWM"
        except OSError:
            self.field = "VmRSS"
        self.before = status_kb(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.grew_mb = (status_kb(self.pid, self.field) - self.before) / 1024


def leaks(text: str, *paths: Path) -> list[str]:
    """Server paths a response body names."""
    found = [str(p) for p in paths if str(p) in text]
    return found + [word for word in ("/tmp/", "site-packages", ".py\"", "/work/", "/home/") if word in text]


def error_of(response: httpx.Response, status: int, param: str | None, code: str, *, elapsed: float | None = None,
             bound: float = FAST_S) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert not leaks(response.text), error
    if elapsed is not None:
        assert elapsed < bound, f"took {elapsed:.2f}s"
    return error


def post(url: str, path: str, *, key: str | None = KEY, headers: dict | None = None,
         **kw) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}{path}", headers={**auth, **(headers or {})}, timeout=120, **kw)
    return response, time.perf_counter() - start


def edit(url: str, image: bytes, fields: dict, **kw) -> tuple[httpx.Response, float]:
    return post(url, "/v1/images/edits", data=fields, files={"image": ("in.png", image, "image/png")}, **kw)


def decode(response: httpx.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


def assert_alive(url: str, image: bytes) -> None:
    response, _ = edit(url, image, EDIT)
    assert response.status_code == 200, response.text[:500]
    assert decode(response)[0].size == (96, 64)


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
        (dict(json={"prompt": "x"}), None, "invalid_body"),  # an edit needs a form
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


def multipart(fields: list[tuple[bytes, bytes]], boundary: bytes = b"xyzzy") -> tuple[bytes, dict]:
    """A multipart body of raw (name, value) fields, bytes as given (no encoding)."""
    parts = [b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value + b"\r\n"
             for name, value in fields]
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
    return b"".join(parts) + b"--" + boundary + b"--\r\n", headers


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


def png_of_size(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG of width x height, a few hundred KB at most however large (zlib of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


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
    # a prompt under the byte cap but over the encoders' token limits runs (truncated to 77 / 512 tokens)
    response, _ = edit(guarded.url, png, {**EDIT, "prompt": ("paint it red " * 200)[:MAX_PROMPT_BYTES]})
    assert response.status_code == 200, response.text[:300]


def test_tokenizers_never_see_a_whole_long_prompt():
    from kontext_trt.core import text

    seen = []

    class Spy:
        def __call__(self, prompts, **kw):
            import torch

            seen.append(max(len(p) for p in prompts))
            return type("Out", (), {"input_ids": torch.zeros(len(prompts), kw.get("max_length") or 600)})()

    text.tokenize(Spy(), ["word " * 1_000_000], text.CLIP_LEN, "CLIP")
    text.tokenize(Spy(), ["word " * 1_000_000], text.T5_LEN, "T5")
    assert seen == [text.CLIP_LEN * text.MAX_CHARS_PER_TOKEN] * 2 + [text.T5_LEN * text.MAX_CHARS_PER_TOKEN] * 2
    assert text.cut("short prompt", text.CLIP_LEN) == "short prompt"


def test_uploads_over_the_cap_are_413_while_reading(guarded, png, server_tmp):
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
    assert list(server_tmp.iterdir()) == []  # nothing spooled to disk
    assert_alive(guarded.url, png)


def raw_upload(port: int, declared: int | None, total: int) -> tuple[int, float, int]:
    """POST an edit whose image part is `total` bytes (Content-Length `declared`, or chunked) over a raw socket,
    stopping as soon as the server answers; (status, seconds, bytes sent)."""
    import select

    boundary = b"rawupload"
    head = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--" + boundary +
            b"\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    lines = [b"POST /v1/images/edits HTTP/1.1", f"Host: 127.0.0.1:{port}".encode(),
             f"Authorization: Bearer {KEY}".encode(), b"Content-Type: multipart/form-data; boundary=" + boundary]
    lines.append(b"Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}".encode())
    start, sent, answer = time.perf_counter(), 0, b""
    chunk = b"\0" * 2**16
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        first = True
        while sent < total and time.perf_counter() - start < 20:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            data = (head if first else b"") + chunk
            first = False
            if declared is None:
                data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            try:
                sock.sendall(data)
            except OSError:  # the server answered and closed
                break
            sent += len(data)
        sock.settimeout(10)
        try:
            while b"\r\n" not in answer:
                got = sock.recv(4096)
                if not got:
                    break
                answer += got
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, time.perf_counter() - start, sent


# --- OpenAI conventions -------------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


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


def test_server_still_edits_after_the_abuse(guarded, png):
    assert_alive(guarded.url, png)
    assert guarded.proc.poll() is None


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_page_sends_the_api_key(guarded, tmp_path):
    """The page (served without a key) edits with the key given once as #key=...: same-origin POSTs pass the Origin
    check; without the key it shows the 401's message."""
    query = urlencode({"sample": 1, "prompt": "add a moon", "steps": 2, "auto_resize": "false", "run": 1})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--virtual-time-budget=90000"]
    for name, fragment, expected in (("key", f"#key={KEY}", "done (batch of 1)"), ("nokey", "", "no API key given")):
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={tmp_path / name}", "--dump-dom",
                              f"{guarded.url}/?{query}{fragment}"], capture_output=True, text=True, timeout=150)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert expected in dom.stdout, dom.stdout[-3000:]
        if name == "key":
            assert re.search(r'<img id="output"[^>]*src="data:image/png;base64,', dom.stdout)


# --- the flags ----------------------------------------------------------------------------------------------------


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
