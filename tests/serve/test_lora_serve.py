"""serve --lora-dir: a request picks a LoRA set by name; batches group by set and swap between batches (/metrics)."""
from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
import torch
from conftest import server_process
from PIL import Image
from safetensors.torch import save_file

from kontext_trt.cli.main import main

EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false", "seed": "4"}


def served_image(url: str, png: bytes, **fields) -> tuple[int, np.ndarray | str]:
    response = httpx.post(f"{url}/v1/images/edits", data={**EDIT, **fields},
                          files={"image": ("in.png", png, "image/png")}, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.json()["error"]["message"]
    img = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    return 200, np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """style.safetensors: a random PEFT-named LoRA on every double block's attention output and feed-forward."""
    folder = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for block in range(2):
        for module, (out, inp) in (("attn.to_out.0", (64, 64)), ("ff.net.0.proj", (256, 64)), ("ff.net.2", (64, 256))):
            key = f"transformer.transformer_blocks.{block}.{module}"
            sd[f"{key}.lora_A.weight"] = torch.randn(4, inp, generator=gen) * 0.2
            sd[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=gen) * 0.2
    save_file(sd, folder / "style.safetensors")
    return folder


@pytest.mark.slow  # a server process: ~14 s
def test_requests_pick_a_lora_set(tiny_ckpt, sample_png, lora_dir, tmp_path):
    png = sample_png.read_bytes()
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--lora-dir", str(lora_dir)) as server:
        code, base = served_image(server.url, png)
        assert code == 200
        code, styled = served_image(server.url, png, lora="style:0.8")
        assert code == 200 and np.abs(styled - base).max() > 10
        code, again = served_image(server.url, png)
        assert code == 200 and np.array_equal(again, base)  # back to the base weights, exactly
        code, message = served_image(server.url, png, lora="nope")
        assert code == 400 and "no LoRA named 'nope'" in message and "style" in message
        metrics = httpx.get(f"{server.url}/metrics").text
    swaps = float(re.search(r"^kontext_lora_swaps_total (\S+)$", metrics, re.M)[1])
    assert swaps == 2  # base -> style -> base; the bad name swapped nothing
    out = tmp_path / "cli.png"
    assert main(["edit", "--model", str(tiny_ckpt), "--dtype", "fp32", "--image", str(sample_png), "--prompt",
                 EDIT["prompt"], "--steps", "2", "--seed", "4", "--no-auto-resize", "--out", str(out),
                 "--lora", f"{lora_dir / 'style.safetensors'}:0.8"]) == 0
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16) - styled).max() <= 1
