"""`kontext-trt bench run/compare` on the tiny checkpoint (CPU backends; CUDA where present): files and errors."""
import json

import jsonschema
import pytest
import torch

from kontext_trt.benchmarks.flops import transformer_flops
from kontext_trt.benchmarks.harness import summarize
from kontext_trt.benchmarks.report import SCHEMA_PATH, load_results
from kontext_trt.benchmarks.transformer_step import preset_config
from kontext_trt.cli.main import main
from kontext_trt.core.errors import KontextError

STAGES = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder")
# (backend, name of the fixture giving its --onnx folder or None); onnxruntime joins as one more entry here.
BACKENDS = [("torch", None), ("onnxruntime", "tiny_onnx")]
SHORT = ["--sizes", "64x64,96x64", "--batch", "1,2", "--steps", "2", "--warmup", "1", "--iters", "2",
         "--dtype", "fp32", "--device", "cpu"]


def bench(capsys, model, out, *extra):
    code = main(["bench", "run", "--model", str(model), "--out", str(out), *map(str, extra)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


@pytest.fixture(scope="module", params=BACKENDS, ids=[b for b, _ in BACKENDS])
def results_dir(request, tiny_ckpt, tmp_path_factory):
    backend, onnx_fixture = request.param
    onnx = ["--onnx", request.getfixturevalue(onnx_fixture)] if onnx_fixture else []
    out = tmp_path_factory.mktemp(f"bench-{backend}")
    assert main(["bench", "run", "--model", str(tiny_ckpt), "--backend", backend, *map(str, onnx), *SHORT,
                 "--out", str(out)]) == 0
    return backend, out


def test_results_match_schema_and_percentiles_are_ordered(results_dir):
    backend, results_dir = results_dir
    results = json.loads((results_dir / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert [(r["width"], r["height"], r["batch"]) for r in results["runs"]] == [
        (64, 64, 1), (64, 64, 2), (96, 64, 1), (96, 64, 2)]
    for run in results["runs"]:
        for stats in [run["e2e_ms"], *run["stages_ms"].values()]:
            assert 0 < stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
            assert stats["min"] <= stats["mean"] <= stats["max"]
        # The default NudeNet check is timed (input and output: 2 calls an edit); these sizes are under the
        # watermark's 256x256 minimum, so no watermark stage.
        assert set(run["stages_ms"]) == {*STAGES, "safety_check"}
        assert run["stages_ms"]["transformer"]["n"] == 2 * 2 and run["stages_ms"]["clip"]["n"] == 2
        assert run["stages_ms"]["safety_check"]["n"] == 2 * 2
        assert len(run["warmup"]["e2e_ms"]) == 1 and run["e2e_ms"]["n"] == 2
        assert run["images_per_s"] == pytest.approx(run["batch"] * 1e3 / run["e2e_ms"]["mean"])
        tokens = run["width"] * run["height"] // 256
        config = results["target"]["transformer_config"]
        flops = transformer_flops(config, tokens, tokens, 512, run["batch"])["total"]
        assert run["roofline"]["flops_per_step"] == flops
        assert run["roofline"]["mfu"] is None and run["roofline"]["tflops"] > 0
        assert run["memory"]["device_peak_allocated_bytes"] is None and run["memory"]["host_peak_rss_bytes"] > 0
    assert results["system"]["gpu"] is None and results["target"]["precision"] == "fp32"
    assert results["target"]["backend"] == backend


def test_table_and_plots_are_written(results_dir):
    _, results_dir = results_dir
    table = (results_dir / "results.md").read_text()
    assert table.count("\n| ") == 2 + 4 and "| 96x64 b2 | 2 |" in table
    for name in ("stages.png", "resolution.png"):
        png = (results_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) < 200_000


def test_compare_gives_ratios_per_stage(capsys, results_dir, tmp_path):
    _, results_dir = results_dir
    results = json.loads((results_dir / "results.json").read_text())
    faster = json.loads(json.dumps(results))
    for run in faster["runs"]:
        run["stages_ms"]["transformer"]["p50"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(faster))
    assert main(["bench", "compare", str(results_dir / "results.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 96x64 b2"))
    assert row.split(" | ")[1:7] == ["1.000", "1.000", "1.000", "1.000", "0.500", "1.000"]


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(schema_version=0), "schema_version 0"),
    (lambda r: r["runs"][0]["e2e_ms"].pop("p99"), "does not match bench.schema.json at runs/0/e2e_ms"),
])
def test_load_results_refuses_bad_files_in_one_line(results_dir, tmp_path, change, message):
    _, results_dir = results_dir
    bad = json.loads((results_dir / "results.json").read_text())
    change(bad)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(KontextError, match=message):
        load_results(tmp_path / "bad.json")


@pytest.mark.parametrize("extra,message", [
    (["--cuda-graphs", "on", "--device", "cpu"], "--cuda-graphs on|both needs --device cuda"),
    (["--sizes", "100x64"], "not a multiple of 16"),
    (["--onnx", "x"], "--backend onnxruntime and --onnx DIR"),
    (["--backend", "onnxruntime"], "--backend onnxruntime and --onnx DIR"),
    (["--precision", "fp8"], "--precision and --sku pick an engine set: add --engines DIR"),
])
def test_bad_arguments_fail_with_one_line(capsys, tiny_ckpt, tmp_path, extra, message):
    code, _, err = bench(capsys, tiny_ckpt, tmp_path / "o", *extra)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_no_model_fails_with_one_line(capsys, tmp_path):
    assert main(["bench", "run", "--out", str(tmp_path)]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_summarize_orders_percentiles():
    stats = summarize([0.003, 0.001, 0.002, 0.010, 0.004])
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(10.0) and stats["n"] == 5
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]


@pytest.mark.slow
def test_slim_checkpoint_one_short_config(capsys, slim_ckpt, tmp_path):
    code, _, _ = bench(capsys, slim_ckpt, tmp_path, "--sizes", "64x64", "--steps", "1", "--warmup", "0",
                       "--iters", "1", "--dtype", "fp32", "--device", "cpu")
    assert code == 0
    results = load_results(tmp_path / "results.json")
    # the checkpoint's config is the one test_flops checks on the meta device
    assert results["runs"][0]["roofline"]["flops_per_step"] == transformer_flops(preset_config("slim"), 16, 16)["total"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_graphs_and_device_memory(capsys, tiny_ckpt, tmp_path):
    code, _, _ = bench(capsys, tiny_ckpt, tmp_path, "--sizes", "64x64", "--steps", "2", "--warmup", "1",
                       "--iters", "2", "--dtype", "bf16", "--device", "cuda", "--cuda-graphs", "both")
    assert code == 0
    results = load_results(tmp_path / "results.json")
    assert [run["cuda_graphs"] for run in results["runs"]] == [False, True] and results["system"]["gpu"]["name"]
    for run in results["runs"]:
        assert run["memory"]["device_peak_allocated_bytes"] > 0 and run["stages_ms"]["transformer"]["n"] == 4


def test_klein_latency_by_reference_count(capsys, klein_tiny_ckpt, tmp_path):
    """bench run --references 1,2,3,4 on synth's klein-tiny (CPU): one run per count, its JSON naming the count and
    the context tokens, the roofline from the klein FLOP model, the Qwen3 text encoder timed."""
    from kontext_trt.benchmarks.flops import step_flops

    code, stdout, _ = bench(capsys, klein_tiny_ckpt, tmp_path, "--sizes", "64x64", "--references", "1,2,3,4",
                            "--steps", "1", "--warmup", "0", "--iters", "1", "--dtype", "fp32", "--device", "cpu",
                            "--safety-checker", "none")
    assert code == 0
    results = load_results(tmp_path / "results.json")
    config = results["target"]["transformer_config"]
    assert config["_class_name"] == "Flux2Transformer2DModel"
    runs = results["runs"]
    assert [r["references"] for r in runs] == [1, 2, 3, 4]
    assert [r["tokens"]["context"] for r in runs] == [16, 32, 48, 64] and runs[0]["tokens"]["text"] == 512
    assert all(r["stages_ms"]["vae_encoder"]["n"] == r["references"] for r in runs)  # each reference encoded alone
    assert all("text_encoder" in r["stages_ms"] and "t5" not in r["stages_ms"] for r in runs)
    assert [r["roofline"]["flops_per_step"] for r in runs] == [step_flops(config, 16, 16 * n, 512)["total"]
                                                                for n in (1, 2, 3, 4)]
    assert "64x64 b1 r4" in stdout and "qwen3 p50 ms" in stdout and "t5 p50 ms" not in stdout


def test_klein_without_steps_runs_and_records_its_default(capsys, klein_tiny_ckpt, tmp_path):
    """bench run without --steps: klein-tiny (step-distilled) runs its 4 steps, and the results say so."""
    code, stdout, _ = bench(capsys, klein_tiny_ckpt, tmp_path, "--sizes", "64x64", "--warmup", "0", "--iters", "1",
                            "--dtype", "fp32", "--device", "cpu", "--safety-checker", "none")
    assert code == 0
    [run] = load_results(tmp_path / "results.json")["runs"]
    assert run["steps"] == 4 and run["stages_ms"]["transformer"]["n"] == 4 and run["cache"]["steps_computed"] == 4
    assert "| 64x64 b1 | 4 |" in stdout
