"""`bench run --cache ... --quality` on the tiny checkpoint (torch, CPU): the runs record the cache spec and the steps
computed/reused, reusing steps makes the edit faster, and the quality figures compare with the uncached edit."""
import json

import jsonschema
import pytest

from kontext_trt.benchmarks.report import SCHEMA_PATH, load_results
from kontext_trt.cli.main import main

STEPS = 8
pytestmark = pytest.mark.serial  # the runs' times are compared (reusing steps is faster): no other test beside them


@pytest.fixture(scope="module")
def results(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-cache")
    assert main(["bench", "run", "--model", str(tiny_ckpt), "--sizes", "64x64", "--steps", str(STEPS),
                 "--warmup", "1", "--iters", "3", "--dtype", "fp32", "--device", "cpu", "--cache", "off",
                 "--cache", "fbcache:0", "--cache", "fbcache:1e9", "--quality", "--out", str(out)]) == 0
    return out


def test_runs_record_the_cache_and_match_the_schema(results):
    data = load_results(results / "results.json")
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    off, zero, huge = data["runs"]
    assert off["cache"] == {"spec": "off", "steps_computed": STEPS, "steps_skipped": 0} and "quality" not in off
    assert zero["cache"] == {"spec": "fbcache:0", "steps_computed": STEPS, "steps_skipped": 0}
    assert huge["cache"] == {"spec": "fbcache:1e+09", "steps_computed": 2, "steps_skipped": STEPS - 2}
    # a cached run's transformer step is timed whole (head + body or reuse + tail), its parts beside it
    assert huge["stages_ms"]["transformer"]["n"] == 3 * STEPS and huge["stages_ms"]["transformer_body"]["n"] == 3 * 2
    assert huge["stages_ms"]["transformer_head"]["n"] == 3 * STEPS and huge["roofline"] is None


def test_reused_steps_make_the_edit_faster(results):
    off, zero, huge = load_results(results / "results.json")["runs"]
    assert huge["breakdown_ms"]["transformer"] < 0.7 * off["breakdown_ms"]["transformer"]
    assert huge["e2e_ms"]["min"] < off["e2e_ms"]["min"]


def test_quality_against_the_uncached_edit(results):
    _, zero, huge = load_results(results / "results.json")["runs"]
    assert zero["quality"]["psnr_db"] is None and zero["quality"]["ssim"] == pytest.approx(1.0)
    assert zero["quality"]["cosine_per_step"] == [1.0] * STEPS or min(zero["quality"]["cosine_per_step"]) > 0.99999
    q = huge["quality"]
    assert len(q["cosine_per_step"]) == STEPS and q["cosine_per_step"][0] == pytest.approx(1.0, abs=1e-6)
    assert q["cosine_min"] < 0.9999 and 10 < q["psnr_db"] < 60 and 0 < q["ssim"] < 1
    table = (results / "results.md").read_text()
    assert "| 64x64 b1 fbcache:1e+09 | 8 (6 reused) |" in table and "| 64x64 b1 fbcache:0 | 8 | identical |" in table


def test_bad_cache_spec_is_one_line(capsys, tiny_ckpt, tmp_path):
    assert main(["bench", "run", "--model", str(tiny_ckpt), "--cache", "fbcache:x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a number" in err and err.count("\n") == 1 and err.startswith("error: argument --cache")
