"""benchmarks/host_overhead.py on the tiny checkpoint: both pipelines run with a zero-cost transformer and report
positive per-step host times (no speed is asserted: this machine is shared)."""
import json

from kontext_trt.benchmarks import host_overhead


def test_both_pipelines_report_positive_step_times(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host_overhead.main(["--model", str(tiny_ckpt), "--size", "64x64", "--steps", "4", "--edits", "2",
                               "--warmup", "1", "--out", str(out)]) == 0
    table, path = capsys.readouterr().out.splitlines()
    assert path == str(out) and table.startswith("host ms per step (median; 64x64, 4 steps, 2 edits")
    report = json.loads(out.read_text())
    assert (report["size"], report["steps"], report["edits"], report["checkpoint"]) == ("64x64", 4, 2, str(tiny_ckpt))
    for name in ("kontext-trt", "diffusers"):
        step, edit = report["results"][name]["step_ms"], report["results"][name]["edit_ms"]
        assert step["n"] == 2 * 3 and step["p50"] > 0 and step["min"] > 0  # 3 gaps between 4 calls per edit
        assert edit["n"] == 2 and edit["p50"] > step["p50"]
        assert f"{step['p50']:.3f}" in table
    assert report["diffusers_over_ours"] > 0 and report["system"]["torch_threads"] == 1


def test_zero_velocity_is_preallocated():
    import torch

    velocity = host_overhead.ZeroVelocity()
    hidden = torch.randn(1, 8, 64)
    first, second = velocity(hidden), velocity(hidden.clone())
    assert first is second and not first.any() and first.shape == hidden.shape
    assert len(velocity.intervals()) == 1 and velocity.intervals() == []
