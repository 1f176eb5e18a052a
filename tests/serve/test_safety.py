"""The server's safety paths: a flagged input or output answers 400 content_policy_violation, /metrics counts
flagged images by label, passing results carry the watermark and, with credentials, a signed C2PA manifest."""
from __future__ import annotations

import base64
import importlib
import io
import json

import c2pa
import httpx
import pytest
from PIL import Image

from kontext_trt.core import image as im
from kontext_trt.safety import watermark
from kontext_trt.safety.guard import OutputPolicy
from kontext_trt.safety.provenance import C2paCredentials

EDIT = {"prompt": "add a moon", "steps": "1", "auto_resize": "false"}


def edit(url: str, png: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", data=EDIT, files={"image": ("in.png", png, "image/png")},
                      timeout=120)


def flagged_metric(text: str, where: str) -> float:
    name = f'kontext_safety_flagged_total{{label="TEST_LABEL",where="{where}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("passing_calls,where", [(2, "input"), (3, "output")])
def test_flagged_answers_400_content_policy_violation(app_server, tiny_pipeline, sample_png, fake_checkers,
                                                      passing_calls, where):
    FlagAfter = importlib.import_module(fake_checkers).FlagAfter
    # The warm-up edit's input and output checks pass (2 calls); then the request's input (call 3) or output is
    # the first image flagged.
    checker = FlagAfter(passing_calls)
    with app_server(tiny_pipeline, {}, policy=OutputPolicy(checker, "fake")) as url:
        response = edit(url, sample_png.read_bytes())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "content_policy_violation" and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{'input image' if where == 'input' else 'output'} flagged by the "
                                           "safety checker (TEST_LABEL)")
        text = httpx.get(f"{url}/metrics").text
        assert flagged_metric(text, where) == 1
        assert flagged_metric(text, "output" if where == "input" else "input") == 0
        assert checker.calls == passing_calls + 1  # the flagged check was the last: nothing ran after it


def test_served_image_is_marked_and_signed(app_server, tiny_pipeline, tmp_path, c2pa_chain):
    source = tmp_path / "big.png"
    im.sample_image(256, 256).save(source)
    policy = OutputPolicy(None, "none", c2pa=C2paCredentials.load(*c2pa_chain))
    with app_server(tiny_pipeline, {}, policy=policy) as url:
        response = edit(url, source.read_bytes())
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    served = Image.open(io.BytesIO(data))
    assert watermark.read(served.convert("RGB")).present
    assert json.loads(served.text["kontext-trt"])["watermark"] == "dwtDct luma KTRT01"
    with c2pa.Reader("image/png", io.BytesIO(data)) as reader:
        manifest = reader.get_active_manifest()
    actions = [a["action"] for assertion in manifest["assertions"] if assertion["label"].startswith("c2pa.actions")
               for a in assertion["data"]["actions"]]
    assert actions == ["c2pa.opened", "c2pa.edited"]
