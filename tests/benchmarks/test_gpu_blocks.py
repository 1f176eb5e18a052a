"""benchmarks/gpu_blocks.py: the dry run on CPU, the refusal without a GPU, the block-timing path at a small width on
the CPU, and (CUDA only) the real thing with few iterations."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kontext_trt.benchmarks import block_timing, gpu_blocks
from kontext_trt.benchmarks.flops import block_flops, transformer_flops
from kontext_trt.benchmarks.transformer_step import preset_config
from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.runtime.flow import EditRequest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, *extra):
    out = tmp_path / "plan.json"
    assert gpu_blocks.main(["--dry-run", "--out", str(out), *extra]) == 0
    return out, json.loads(out.read_text())


def test_dry_run_writes_the_plan_and_the_flop_model(tmp_path, capsys):
    out, report = dry_run(tmp_path)
    assert capsys.readouterr().out == f"{out}\n"  # the JSON's path on stdout, nothing else
    full = preset_config("full")
    assert report["flops_per_step"] == transformer_flops(full, 4096, 4096, 512, 1)
    assert report["flops_per_step"]["total"] == pytest.approx(1.65e14, rel=0.01)
    assert report["flops_per_block"] == block_flops(full, 4096, 4096, 512, 1)
    step = report["flops_per_step"]
    assert (19 * report["flops_per_block"]["double"] + 38 * report["flops_per_block"]["single"]
            == step["double"] + step["single"] + step["attention"])
    plan = report["plan"]
    assert plan["tokens"] == {"target": 4096, "context": 4096, "text": 512, "sequence": 8704}
    assert plan["width"] == {"hidden": 3072, "heads": 24, "head_dim": 128, "mlp_ratio": 4}
    assert {kind: block["per_step"] for kind, block in plan["blocks"].items()} == {"double": 19, "single": 38}
    assert plan["blocks"]["double"]["class"] == "diffusers FluxTransformerBlock"
    assert plan["blocks"]["single"]["class"] == "diffusers FluxSingleTransformerBlock"
    assert plan["blocks"]["double"]["inputs"]["hidden_states"] == [1, 8192, 3072]
    assert plan["blocks"]["double"]["inputs"]["image_rotary_emb"] == [[8704, 128], [8704, 128]]
    assert list(plan["dtypes"]) == ["bf16", "fp8", "nvfp4"]
    assert {name: d["needs_sm"] for name, d in plan["dtypes"].items()} == {"bf16": 80, "fp8": 89, "nvfp4": 100}
    assert plan["dtypes"]["nvfp4"]["needs"] == "sm100 (Blackwell) or later"
    assert (plan["iters"], plan["warmup"], plan["steps_per_edit"]) == (50, 10, 28)
    assert report["mode"] == "dry-run" and report["device"] is None and report["results"] is None


def test_dry_run_takes_dtypes_and_iterations(tmp_path):
    _, report = dry_run(tmp_path, "--dtypes", "fp8,bf16", "--iters", "20", "--warmup", "2")
    assert list(report["plan"]["dtypes"]) == ["fp8", "bf16"]
    assert (report["plan"]["iters"], report["plan"]["warmup"]) == (20, 2)


@pytest.mark.parametrize("args,message", [
    (["--dtypes", "bf16,int4"], "--dtypes 'bf16,int4': use a comma-separated subset of bf16,fp8,nvfp4"),
    (["--iters", "0"], "--iters '0': give a whole number from 1 to 1000"),
    (["--warmup", "many"], "--warmup 'many': give a whole number from 0 to 100"),
])
def test_bad_arguments_are_one_usage_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        gpu_blocks.main(["--dry-run", "--out", str(tmp_path / "x.json"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_dry_run_imports_no_torch(tmp_path):
    """--dry-run must not import CUDA-only things: it imports no torch at all."""
    code = ("import sys; from kontext_trt.benchmarks import gpu_blocks; "
            f"rc = gpu_blocks.main(['--dry-run', '--out', {str(tmp_path / 'p.json')!r}]); "
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_constants_agree_with_the_runtime():
    assert gpu_blocks.TEXT_TOKENS == T5_MAX_LEN
    assert gpu_blocks.STEPS == EditRequest(prompts=["x"]).steps
    assert gpu_blocks.CONFIG == preset_config("full")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a host without a GPU")
def test_without_gpu_exits_2_with_one_line(tmp_path, capsys):
    assert gpu_blocks.main(["--out", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: gpu_blocks times the blocks on a CUDA GPU") and captured.err.count("\n") == 1
    assert "--dry-run" in captured.err and captured.out == ""
    assert not (tmp_path / "r.json").exists()


def test_dtype_refusals():
    hopper = "nvfp4 needs sm100 (Blackwell) or later; this GPU is sm90 (Hopper)"
    assert block_timing.dtype_refusal("nvfp4", 90) == hopper
    assert block_timing.dtype_refusal("fp8", 80) == "fp8 needs sm89 (Ada) or later; this GPU is sm80 (Ampere)"
    assert block_timing.dtype_refusal("fp8", 90) is None and block_timing.dtype_refusal("bf16", 90) is None
    assert block_timing.dtype_refusal("nvfp4", 100) is None and block_timing.dtype_refusal("nvfp4", 120) is None
    assert block_timing.dtype_refusal("nvfp4", None) == "nvfp4 needs a CUDA GPU of sm100 (Blackwell) or later"


def test_mfu_reasons():
    unknown = {"name": "NVIDIA Z9", "sku": None, "peak_tflops": {}}
    assert gpu_blocks.mfu_reason(unknown, "bf16") == ("NVIDIA Z9 is not in the SKU table (engines/skus.py): no dense "
                                                      "peak to compare with")
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "sku": "a100", "peak_tflops": {"bf16": 312.0}}
    assert gpu_blocks.mfu_reason(a100, "fp8") == "the SKU table has no dense fp8 peak for a100"
    assert gpu_blocks.mfu_reason(a100, "bf16") is None


@pytest.fixture(scope="module")
def small_run():
    """The GPU path's block timing at the tiny preset's width (hidden 64 = 2 heads x 32) on the CPU: a 32x32 edit
    (4 target + 4 context tokens), 8 text tokens, perf_counter instead of CUDA events."""
    config = preset_config("tiny")
    results = block_timing.measure_blocks(config, (32, 32), 8, ("bf16", "fp8", "nvfp4"), 1, 3, torch.device("cpu"),
                                          {"bf16": 100.0}, None)
    return config, results


def test_small_width_cpu_run_times_both_blocks(small_run):
    config, results = small_run
    flops = block_flops(config, 4, 4, 8)
    for kind in ("double", "single"):
        bf16 = results["bf16"][kind]
        assert bf16["ms"]["n"] == 3 and 0 < bf16["ms"]["min"] <= bf16["ms"]["p50"] <= bf16["ms"]["max"]
        assert bf16["flops"] == flops[kind]
        assert bf16["tflops"] == pytest.approx(flops[kind] / (bf16["ms"]["p50"] / 1e3) / 1e12)
        assert bf16["mfu"] == pytest.approx(bf16["tflops"] / 100.0) and bf16["peak_tflops"] == 100.0
        assert bf16["delta_rel_error_vs_bf16"] == 0.0 and bf16["finite"]
        fp8 = results["fp8"][kind]
        assert fp8["ms"]["n"] == 3 and fp8["ms"]["p50"] > 0 and fp8["mfu"] is None and fp8["finite"]
        assert 0 < fp8["delta_rel_error_vs_bf16"] < 0.3  # e4m3 has 3 mantissa bits
    assert results["fp8"]["linears_replaced"] == {"double": 14, "single": 6}
    assert results["nvfp4"] == {"skipped": "nvfp4 needs a CUDA GPU of sm100 (Blackwell) or later"}


def test_step_and_edit_are_extrapolated_from_the_blocks(small_run):
    _, results = small_run
    entry = results["bf16"]
    flops = {"double": 1_000_000_000_000, "single": 2_000_000_000_000}
    extra = gpu_blocks.extrapolate(entry, flops)
    step_ms = 19 * entry["double"]["ms"]["p50"] + 38 * entry["single"]["ms"]["p50"]
    assert extra["step"]["ms"] == pytest.approx(step_ms) and extra["edit_ms"] == pytest.approx(28 * step_ms)
    assert extra["step"]["blocks_flops"] == 95_000_000_000_000
    assert extra["step"]["tflops"] == pytest.approx(95 / step_ms * 1e3)
    assert extra["step"]["mfu"] == pytest.approx(extra["step"]["tflops"] / 100.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_width_on_the_gpu(tmp_path):
    out = tmp_path / "blocks.json"
    assert gpu_blocks.main(["--out", str(out), "--iters", "3", "--warmup", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "measured" and report["device"]["sm"] >= 80
    bf16 = report["results"]["bf16"]
    for kind in ("double", "single"):
        assert bf16[kind]["ms"]["n"] == 3 and bf16[kind]["ms"]["p50"] > 0 and bf16[kind]["finite"]
    assert bf16["step"]["ms"] > 0 and bf16["edit_ms"] == pytest.approx(28 * bf16["step"]["ms"])
    fp8, nvfp4 = report["results"]["fp8"], report["results"]["nvfp4"]
    assert ("double" in fp8) == (report["device"]["sm"] >= 89)
    assert ("skipped" in nvfp4) == (report["device"]["sm"] < 100)
