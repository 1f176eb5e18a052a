"""FLUX.2 [klein] through the server (the real app over synth's klein-tiny): several references as `image[]` form
fields from the openai SDK and as a JSON list, equal to the Python API's edit; at most the family's references (FLUX.1
refuses a second one); a request without steps runs the checkpoint's (4, distilled); requests of a base checkpoint
with and without CFG run as separate batches."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from dataclasses import replace

import httpx
import numpy as np
import pytest
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.pipeline import KontextPipeline
from kontext_trt.runtime import flow
from kontext_trt.safety.guard import OutputPolicy

REFS = [im.sample_image(64, 64, seed=1), im.sample_image(96, 64, seed=2), im.sample_image(80, 112, seed=3)]
NO_CHECKER = OutputPolicy(None, "none")


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def klein(klein_tiny_ckpt):
    return build_pipeline(LoadSpec(klein_tiny_ckpt, dtype="fp32"))


def test_three_references_from_the_openai_sdk_and_json_equal_the_api(app_server, klein):
    import openai

    expected = KontextPipeline(klein, NO_CHECKER)("add snow", images=REFS, num_inference_steps=2, generator_seed=3)
    with app_server(klein, {}, policy=NO_CHECKER) as url:
        client = openai.OpenAI(api_key="none", base_url=f"{url}/v1", max_retries=0, timeout=120)
        files = [(f"ref{i}.png", png(img), "image/png") for i, img in enumerate(REFS)]
        sdk = client.images.edit(image=files, prompt="add snow", extra_body={"steps": 2, "seed": 3})
        body = {"prompt": "add snow", "steps": 2, "seed": 3,
                "images": [{"image_url": "data:image/png;base64," + base64.b64encode(png(img)).decode()}
                           for img in REFS]}
        as_json = httpx.post(f"{url}/v1/images/edits", json=body, timeout=120)
        swapped = httpx.post(f"{url}/v1/images/edits", timeout=120, json={**body, "images": body["images"][::-1]})
        too_many = httpx.post(f"{url}/v1/images/edits", data={"prompt": "x"}, timeout=60,
                              files=[("image[]", (f"{i}.png", png(REFS[0]), "image/png")) for i in range(5)])
        fetch = httpx.post(f"{url}/v1/images/edits", timeout=60,
                           json={"prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]})
        default = httpx.post(f"{url}/v1/images/edits", data={"prompt": "add snow", "seed": "3"}, timeout=120,
                             files=[("image[]", ("a.png", png(REFS[0]), "image/png"))])
        page = httpx.get(f"{url}/", timeout=30).text
    got = decoded(sdk.data[0].b64_json)
    assert got.size == (64, 64)  # the first reference's size
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected.images[0]))
    meta = json.loads(got.text["kontext-trt"])
    assert (meta["references"], meta["guidance"], meta["seed"]) == (3, 4.0, 3)  # klein's default guidance
    assert as_json.status_code == 200, as_json.text
    assert np.array_equal(np.asarray(decoded(as_json.json()["data"][0]["b64_json"]).convert("RGB")),
                          np.asarray(expected.images[0]))
    assert swapped.status_code == 200 and decoded(swapped.json()["data"][0]["b64_json"]).size == (80, 112)
    assert too_many.status_code == 400
    assert {k: too_many.json()["error"][k] for k in ("param", "code")} == {"param": "image", "code": "out_of_range"}
    assert "at most 4" in too_many.json()["error"]["message"]
    assert fetch.status_code == 400 and fetch.json()["error"]["code"] == "unsupported_value"
    assert default.status_code == 200, default.text  # no steps sent: klein-tiny (step-distilled) runs its 4
    assert json.loads(decoded(default.json()["data"][0]["b64_json"]).text["kontext-trt"])["steps"] == 4
    for name in ("steps", "guidance"):  # the page leaves both to the model (an empty field is not sent as a value)
        box = re.search(rf'<input id="{name}"[^>]*>', page)[0]
        assert "value=" not in box and 'placeholder="default"' in box, box


def test_flux1_refuses_a_second_image_naming_the_field(app_server, tiny_pipeline):
    with app_server(tiny_pipeline, {}, policy=NO_CHECKER) as url:
        response = httpx.post(f"{url}/v1/images/edits", data={"prompt": "x", "steps": "1"}, timeout=60,
                              files=[("image[]", (f"{i}.png", png(REFS[0]), "image/png")) for i in range(2)])
        one = httpx.post(f"{url}/v1/images/edits", data={"prompt": "x", "steps": "1", "auto_resize": "false"},
                         files=[("image[]", ("a.png", png(REFS[0]), "image/png"))], timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and (error["param"], error["code"]) == ("image", "out_of_range")
    assert "FLUX.1 Kontext edits from one image, 2 were given" in error["message"] and "--" not in error["message"]
    assert one.status_code == 200, one.text  # a list of one is the one image
    assert json.loads(decoded(one.json()["data"][0]["b64_json"]).text["kontext-trt"])["guidance"] == 2.5


def test_cfg_and_no_cfg_requests_of_a_base_checkpoint_split_into_batches(app_server, klein_tiny_base_ckpt):
    k = build_pipeline(LoadSpec(klein_tiny_base_ckpt, dtype="fp32"))
    req = flow.request(["add snow"], REFS[:2], steps=2, seed=5)
    cfg, no_cfg, other = (replace(req, guidance=g) for g in (None, 1.0, 6.0))
    assert flow.batch_key(k, cfg) != flow.batch_key(k, no_cfg) != flow.batch_key(k, other)
    assert flow.batch_key(k, cfg) == flow.batch_key(k, replace(req, guidance=4.0))

    async def both(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            files = [("image[]", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(REFS[:2])]
            return await asyncio.gather(*(client.post(f"{url}/v1/images/edits", files=files,
                                                      data={"prompt": "add snow", "steps": "2", "seed": "5", **g})
                                          for g in ({}, {"guidance": "1"})))

    with app_server(k, {}, window_s=1.0, policy=NO_CHECKER) as url:
        responses = asyncio.run(both(url))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert [r.headers["x-batch-size"] for r in responses] == ["1", "1"]  # split by key, not merged then rerun
    alone = [flow.edit(k, r) for r in (cfg, no_cfg)]
    for response, direct in zip(responses, alone):
        got = np.asarray(decoded(response.json()["data"][0]["b64_json"]).convert("RGB"), dtype=int)
        assert np.abs(got - np.asarray(direct.images[0], dtype=int)).max() <= 1
    assert np.abs(np.asarray(alone[0].images[0], dtype=int) - np.asarray(alone[1].images[0], dtype=int)).max() > 0
