"""Two exports racing into one folder: every stage ends in the manifest, with the sha256 of what is on disk."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.onnx_dir import file_identity, read_onnx_dir

SCRIPT = Path(sys.executable).with_name("kontext-trt")


@pytest.mark.slow  # three export processes: ~20 s
def test_concurrent_exports_keep_every_stage_and_hash_it(tiny_ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "onnx"
    procs = [subprocess.Popen([str(SCRIPT), "export", "--model", str(tiny_ckpt), "--out", str(out), "--dtype", "fp32",
                               "--stages", stages], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
             for stages in ("clip,vae_decoder", "t5", "t5")]
    for proc in procs:
        assert proc.wait(timeout=1200) == 0, proc.stderr.read()
    manifest = read_export_manifest(out)
    assert set(manifest.stages) == {"clip", "t5", "vae_decoder"}
    for entry in manifest.stages.values():
        assert entry["sha256"] == file_identity(out / entry["file"])
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    read_onnx_dir(out)  # verifies every hash
    data = out / "t5" / "model.onnx"
    data.write_bytes(data.read_bytes()[:-1] + b"\0")  # one byte changed
    try:
        read_onnx_dir(out)
    except KontextError as error:
        assert "sha256 differs" in str(error) and str(data) in str(error)
    else:
        raise AssertionError("a changed ONNX file was accepted")


def test_onnxruntime_backend_refuses_a_changed_onnx(tiny_onnx, tmp_path):
    import shutil

    import torch

    from kontext_trt.assemble import load_onnx as load_ort_kontext

    copy = Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))
    load_ort_kontext(copy, torch.device("cpu"))  # matches: loads
    graph = copy / "vae_decoder" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1  # one bit flipped in the graph's last byte
    graph.write_bytes(bytes(data))
    try:
        load_ort_kontext(copy, torch.device("cpu"))
    except KontextError as error:
        assert str(graph) in str(error) and ("sha256 differs" in str(error) or "not a readable ONNX" in str(error))
        assert "\n" not in str(error)
    else:
        raise AssertionError("a changed ONNX file was loaded")
