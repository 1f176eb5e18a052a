"""Caches that verify what they hold (sha256 of every plan) and builds that may run concurrently into one folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import sha256_file
from kontext_trt.engines import build, cache, trt_api
from kontext_trt.engines.cache import find_engines
from kontext_trt.engines.skus import SKUS

RTX = trt_api.load_api("tensorrt-rtx").folder
SCRIPT = Path(sys.executable).with_name("kontext-trt")


def clip_build(onnx_dir, out):
    return build.BuildRequest(onnx_dir=onnx_dir, out=out, sku=SKUS["rtx4090"], target=build.Target("tensorrt-rtx", (89,)),
                              stages=("clip",))


def test_same_size_random_plan_is_refused_at_load_and_rebuilt(engine_onnx, tmp_path):
    folder, done = build.build_set(clip_build(engine_onnx, tmp_path))
    plan = folder / "clip.plan"
    good = plan.read_bytes()
    entry = cache.read_engine_manifest(folder).stages["clip"]
    assert done == ["clip"] and entry["sha256"] == sha256_file(plan) and entry["engine_bytes"] == len(good)
    random_bytes = os.urandom(len(good))
    plan.write_bytes(random_bytes)  # the size the manifest records, other bytes
    with pytest.raises(KontextError, match="does not have the sha256 the manifest records") as caught:
        find_engines(tmp_path, "rtx4090", RTX, "fp32", 1024, 1024, stages=("clip",))
    assert "rebuild: kontext-trt build" in str(caught.value) and "\n" not in str(caught.value)
    _, done = build.build_set(clip_build(engine_onnx, tmp_path))
    rebuilt = cache.read_engine_manifest(folder).stages["clip"]
    assert done == ["clip"] and plan.read_bytes() != random_bytes  # rebuilt, not reused
    assert rebuilt["sha256"] == sha256_file(plan) and rebuilt["engine_bytes"] == plan.stat().st_size
    assert find_engines(tmp_path, "rtx4090", RTX, "fp32", 1024, 1024, stages=("clip",)).plans["clip"] == plan


def race(*argvs):
    """Start every command at once and wait for all: (exit code, stderr) each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([str(SCRIPT), *map(str, argv)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              env=env, text=True) for argv in argvs]
    return [(p.wait(timeout=900), p.stderr.read()) for p in procs]


@pytest.mark.slow  # three build processes: ~10 s
def test_concurrent_builds_into_one_folder_keep_every_stage(engine_onnx, tmp_path):
    common = ["build", "--onnx", engine_onnx, "--sku", "rtx4090"]
    different = race([*common, "--out", tmp_path / "a", "--stages", "clip", "vae_decoder"],
                     [*common, "--out", tmp_path / "a", "--stages", "t5"])
    identical = race([*common, "--out", tmp_path / "b", "--stages", "clip"],
                     [*common, "--out", tmp_path / "b", "--stages", "clip"])
    for code, err in different + identical:
        assert code == 0, err
    for root, stages in (("a", {"clip", "t5", "vae_decoder"}), ("b", {"clip"})):
        folder = tmp_path / root / "rtx4090-sm89" / RTX / "fp32"
        manifest = cache.read_engine_manifest(folder)
        assert set(manifest.stages) == stages and set(manifest.build["stages"]) == stages
        for stage, entry in manifest.stages.items():
            assert cache.plan_problem(folder / entry["file"], entry) is None
        assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
