"""enroot/launch.py: one sbatch job per fleet entry, skipping built engines, nothing submitted on bad input."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kontext_trt.enroot import launch

SAMPLE = Path(launch.__file__).with_name("fleet.example.toml")
SCRIPT = Path(launch.__file__).with_name("build_engines.sbatch")
IMAGE, ONNX = "/shared/kontext-trt-25.12-py3.sqsh", "/shared/onnx"


@pytest.fixture
def fake_sbatch(tmp_path: Path) -> tuple[Path, Path]:
    """An sbatch stand-in that appends its arguments to a log and answers a job id."""
    log = tmp_path / "sbatch.log"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\necho 4242\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    return sbatch, log


def built(engines: Path, tag: str, precision: str) -> None:
    """Leave a complete manifest in the cache, as a finished build would."""
    folder = engines / tag / "tensorrt-10.14.1" / precision
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")


def args(fleet: Path, engines: Path, *extra: str) -> list[str]:
    """The launcher's command line for one test."""
    return [str(fleet), "--image", IMAGE, "--onnx", ONNX, "--engines", str(engines), *extra]


def container_lines(engines: Path, sku: str, precisions: list[str], sizes: str) -> list[str]:
    """What build_engines.sbatch --dry-run prints for one job, indented as the launcher shows it."""
    build = (f"  srun --container-image={IMAGE} --container-mounts={ONNX}:/onnx:ro,{engines}:/engines "
             f"--no-container-mount-home kontext-trt build --onnx /onnx --out /engines --backend tensorrt --sku {sku}")
    return [f"  mkdir -p {engines}", *(f"{build} --precision {p} --sizes {sizes}" for p in precisions)]


def test_dry_run_prints_sbatch_and_container_commands_and_skips_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SBATCH", raising=False)
    engines = tmp_path / "engines"
    built(engines, "l40s-sm89", "fp8")
    assert launch.main(args(SAMPLE, engines, "--dry-run")) == 0
    common = f"--image {IMAGE} --onnx {ONNX} --out {engines}"
    b200_sizes = "1024x1024,1328x800,800x1328"
    assert capsys.readouterr().out.splitlines() == [
        "sbatch --parsable --partition=h100 --job-name=kontext-trt-h100-sxm --gres=gpu:1 --time=03:00:00 "
        f"{SCRIPT} {common} --sku h100-sxm --backend tensorrt --precision bf16,fp8 --sizes all",
        *container_lines(engines, "h100-sxm", ["bf16", "fp8"], "all"),
        "sbatch --parsable --partition=b200 --job-name=kontext-trt-b200 --gres=gpu:b200:1 --account=inference "
        f"{SCRIPT} {common} --sku b200 --backend tensorrt --precision fp8,nvfp4 --sizes {b200_sizes}",
        *container_lines(engines, "b200", ["fp8", "nvfp4"], b200_sizes),
        f"skip entry 3: l40s fp8 already in {engines}/l40s-sm89",
    ]


def test_submits_one_job_per_entry_for_the_missing_precisions_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_sbatch: tuple[Path, Path]
) -> None:
    sbatch, log = fake_sbatch
    engines = tmp_path / "engines"
    built(engines, "b200-sm100", "fp8")
    built(engines, "l40s-sm89", "fp8")
    assert launch.main(args(SAMPLE, engines, "--sbatch", str(sbatch))) == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    assert calls[0].startswith("--parsable --partition=h100 ") and calls[0].endswith("--precision bf16,fp8 --sizes all")
    assert "--partition=b200 " in calls[1] and "--precision nvfp4 --sizes" in calls[1]
    out = capsys.readouterr().out.splitlines()
    assert "entry 1: h100-sxm on h100: job 4242" in out
    assert "entry 2: b200 on b200: job 4242" in out


def test_sbatch_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_sbatch: tuple[Path, Path]
) -> None:
    sbatch, log = fake_sbatch
    monkeypatch.setenv("SBATCH", str(sbatch))
    assert launch.main(args(SAMPLE, tmp_path / "engines")) == 0
    assert len(log.read_text().splitlines()) == 3


BAD = {
    "unknown sku": (
        '[[build]]\npartition = "h100"\nsku = "h100-sxm"\nprecision = "bf16"\n'
        '[[build]]\npartition = "x"\nsku = "h1000"\nprecision = "bf16"\n',
        "error: fleet.toml entry 2: unknown sku 'h1000'; known: h100-sxm, h100-pcie, h200, b200, l40s, a100, "
        "rtx4090, rtx5090",
    ),
    "missing partition": (
        '[[build]]\npartition = "h100"\nsku = "h100-sxm"\nprecision = "bf16"\n'
        '[[build]]\nsku = "l40s"\nprecision = "fp8"\n',
        "error: fleet.toml entry 2: missing partition",
    ),
    "precision the sku lacks": (
        '[[build]]\npartition = "a100"\nsku = "a100"\nprecisions = ["bf16", "fp8"]\n',
        "error: fleet.toml entry 1: sku 'a100' has no fp8; it supports bf16",
    ),
    "bad size": (
        '[[build]]\npartition = "h100"\nsku = "h100-sxm"\nprecision = "bf16"\nsizes = ["1024"]\n',
        "error: fleet.toml entry 1: bad size '1024'; want \"WxH\" like \"1024x1024\"",
    ),
    "same sku twice": (
        '[[build]]\npartition = "a"\nsku = "h200"\nprecision = "fp8"\n'
        '[[build]]\npartition = "b"\nsku = "h200"\nprecisions = ["bf16", "fp8"]\n',
        "error: fleet.toml entry 2: sku 'h200' fp8 is already in entry 1",
    ),
    "not toml": ("[[build]\n", None),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_matrix_is_one_line_exit_2_and_nothing_submitted(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_sbatch: tuple[Path, Path]
) -> None:
    matrix, expected = BAD[case]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(matrix)
    sbatch, log = fake_sbatch
    assert launch.main(args(fleet, tmp_path / "engines", "--sbatch", str(sbatch))) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line == expected if expected else line.startswith("error: fleet.toml: ")
    assert captured.out == ""
    assert not log.exists()


def test_failed_sbatch_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sbatch = tmp_path / "sbatch"
    sbatch.write_text('#!/usr/bin/env bash\necho "sbatch: error: invalid partition specified: h100" >&2\nexit 1\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    assert launch.main(args(SAMPLE, tmp_path / "engines", "--sbatch", str(sbatch))) == 1
    assert capsys.readouterr().err == "error: entry 1: sbatch: error: invalid partition specified: h100\n"
