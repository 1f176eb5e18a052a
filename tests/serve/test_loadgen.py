"""`kontext-trt bench serve`: bounded load on a loopback server, results in `bench run`'s validated format."""
from __future__ import annotations

import json

from kontext_trt.cli.main import main


def test_bench_serve_writes_bench_results(served, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "serve", "--url", served.url, "--concurrency", "1,3", "--requests", "3", "--warmup", "1",
                 "--size", "64x64", "--steps", "2", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())  # write_all validated it against bench.schema.json
    assert [run["load"]["concurrency"] for run in results["runs"]] == [1, 3]
    for run in results["runs"]:
        assert run["load"]["statuses"] == {"200": 3} and run["iters"] == 3
        assert 0 < run["e2e_ms"]["p50"] <= run["e2e_ms"]["p99"] and run["images_per_s"] > 0
        assert run["stages_ms"]["transformer"]["p50"] > 0 and run["stages_ms"]["vae_encoder"]["p50"] > 0
        assert list(run["stages_ms"]) == ["clip", "t5", "vae_encoder", "transformer", "vae_decoder"]
    assert results["runs"][1]["load"]["mean_server_batch"] > 1  # three at once share the server's window
    assert results["target"]["backend"] == "torch" and results["target"]["dtype"] == "fp32"
    assert "64x64 b1 c3" in (out / "results.md").read_text() and "64x64 b1 c3" in stdout


def test_bench_serve_without_steps_records_the_steps_the_server_ran(app_server, klein_tiny_ckpt, tmp_path, capsys):
    """No --steps: none is sent, the server runs its model's default (klein-tiny: 4), and the results record 4."""
    from kontext_trt.assemble import build_pipeline
    from kontext_trt.core.specs import LoadSpec
    from kontext_trt.safety.guard import OutputPolicy

    k = build_pipeline(LoadSpec(klein_tiny_ckpt, dtype="fp32"))
    out = tmp_path / "bench"
    with app_server(k, {}, policy=OutputPolicy(None, "none")) as url:
        code = main(["bench", "serve", "--url", url, "--concurrency", "1", "--requests", "1", "--warmup", "0",
                     "--size", "64x64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["steps"] == 4 and run["load"]["statuses"] == {"200": 1}
    assert list(run["stages_ms"]) == ["text_encoder", "vae_encoder", "transformer", "vae_decoder"]  # klein's stages
    assert run["stages_ms"]["text_encoder"]["p50"] > 0 and "text_encoder" in run["breakdown_ms"]


def test_bench_serve_refuses_other_hosts_and_absent_servers(capsys):
    assert main(["bench", "serve", "--url", "http://192.0.2.1:8000"]) == 2
    assert "loopback servers only" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9"]) == 2
    assert "no server answers" in capsys.readouterr().err
