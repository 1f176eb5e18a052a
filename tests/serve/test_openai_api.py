"""The server's OpenAI endpoints against `kontext-trt serve` on loopback: CLI-equal PNGs, batching, errors, metrics."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from kontext_trt.cli.main import main

EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false"}


def edit(url: str, png: bytes, fields: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", data=fields, files={"image": ("in.png", png, "image/png")},
                      timeout=120, **kw)


def decode(response: httpx.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_edit_equals_the_cli(served, tiny_ckpt, sample_png, tmp_path, capsys):
    response = edit(served.url, sample_png.read_bytes(), {**EDIT, "seed": "4", "guidance": "3.0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    served_png = decode(response)[0]
    out = tmp_path / "cli.png"
    assert main(["edit", "--model", str(tiny_ckpt), "--dtype", "fp32", "--image", str(sample_png), "--prompt",
                 "add a moon", "--steps", "2", "--seed", "4", "--guidance", "3.0", "--no-auto-resize",
                 "--out", str(out)]) == 0
    cli_png = Image.open(out)
    assert served_png.size == cli_png.size == (96, 64)
    assert np.abs(pixels(served_png) - pixels(cli_png)).max() <= 1
    assert json.loads(served_png.text["kontext-trt"]) == json.loads(cli_png.text["kontext-trt"])
    assert "transformer;dur=" in response.headers["server-timing"]


def test_n_images_and_generations(served):
    response = httpx.post(f"{served.url}/v1/images/generations", timeout=120,
                          json={"prompt": "a red house", "n": 2, "size": "80x64", "steps": 1, "seed": 9})
    assert response.status_code == 200, response.text
    images = decode(response)
    assert [img.size for img in images] == [(80, 64)] * 2
    meta = json.loads(images[1].text["kontext-trt"])
    assert meta["edited"] is False and meta["seed"] == 10 and meta["prompt"] == "a red house"  # image i: seed + i
    assert json.loads(images[0].text["kontext-trt"])["seed"] == 9
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 0  # two seeds' noise


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_requests_batch_and_keep_their_seeds(served, sample_png):
    png = sample_png.read_bytes()

    async def burst():
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*[
                client.post(f"{served.url}/v1/images/edits", data={**EDIT, "seed": str(seed)},
                            files={"image": ("in.png", png, "image/png")}) for seed in range(8)])

    before = httpx.get(f"{served.url}/metrics").text
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8
    images = [pixels(decode(r)[0]) for r in responses]
    assert all(np.abs(images[i] - images[j]).max() > 0 for i in range(8) for j in range(i + 1, 8))
    batches = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(batches) > 1
    after = httpx.get(f"{served.url}/metrics").text
    ran = metric(after, "kontext_batch_size_count") - metric(before, "kontext_batch_size_count")
    images_run = metric(after, "kontext_batch_size_sum") - metric(before, "kontext_batch_size_sum")
    assert images_run == 8 and ran < 8  # some batch held more than one request
    # a batched request's image equals the same request served alone
    batched = next(i for i, b in enumerate(batches) if b > 1)
    alone = edit(served.url, png, {**EDIT, "seed": str(batched)})
    assert alone.headers["x-batch-size"] == "1"
    assert np.abs(pixels(decode(alone)[0]) - images[batched]).max() <= 1


@pytest.mark.parametrize("fields,image,message", [
    ({"steps": "1"}, True, "prompt is missing"),
    ({"prompt": "x", "response_format": "url"}, True, "response_format url is not offered"),
    ({"prompt": "x", "size": "100x64"}, True, "width 100 is not a multiple of 16"),
    ({"prompt": "x", "size": "4096x64"}, True, "out of range"),
    ({"prompt": "x", "size": "big"}, True, "not WIDTHxHEIGHT"),
    ({"prompt": "x", "guidance": "nan"}, True, "guidance nan is not a finite number"),
    ({"prompt": "x", "guidance": "abc"}, True, "guidance 'abc' is invalid"),
    ({"prompt": "x", "seed": str(2**64)}, True, "seed 18446744073709551616 is outside 0.."),
    ({"prompt": "x", "true_cfg": "3"}, True, "true_cfg 3.0 needs a negative_prompt"),
    ({"prompt": "x", "steps": "0"}, True, "steps must be at least 1"),
    ({"prompt": "x", "n": "11"}, True, "n '11' must be an integer from 1 to 10"),
    ({"prompt": "x", "colour": "red"}, True, "unrecognized field 'colour'"),
    ({"prompt": "x"}, False, "send an image file in the `image` field"),
    ({"prompt": "x"}, b"not an image", "not a readable PNG"),
])
def test_bad_requests_answer_400_in_openai_shape(served, sample_png, fields, image, message):
    files = {}
    if image is True:
        files = {"image": ("in.png", sample_png.read_bytes(), "image/png")}
    elif image:
        files = {"image": ("in.png", image, "image/png")}
    response = httpx.post(f"{served.url}/v1/images/edits", data=fields, files=files or None, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]


def test_bad_json_bodies_answer_400(served):
    for body in (b"{not json", b"[1, 2]", b'{"prompt": ""}'):
        response = httpx.post(f"{served.url}/v1/images/generations", content=body,
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(served):
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok", "pid": served.proc.pid}
    text = httpx.get(f"{served.url}/metrics").text
    for name in ("kontext_requests_total", "kontext_queue_depth", "kontext_batch_size_bucket",
                 'kontext_stage_seconds_bucket{le="0.005",stage="transformer"}'):
        assert name in text
    assert 'kontext_requests_total{endpoint="/v1/images/edits",status="400"}' in text
