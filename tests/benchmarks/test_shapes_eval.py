"""`kontext-trt eval` on the random tiny checkpoint (fast, a few edits of 2 steps): the JSON it writes, the outputs it
keeps, the comparison with a reference run, the calibration set it writes, and its one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kontext_trt.benchmarks.shapes_eval import PSNR_CAP, RUN_JSON
from kontext_trt.cli.main import main
from kontext_trt.quant.calib_data import read_entries
from kontext_trt.shapes.scenes import EDITS, HELD_OUT_SEED, held_out_edits, render

QUICK = ["--n", "4", "--steps", "2", "--batch", "4", "--dtype", "fp32", "--device", "cpu"]


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    """main(["eval", ...]): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def first_run(tiny_ckpt, tmp_path_factory) -> tuple[dict, Path]:
    """One quick eval that keeps its outputs: (its JSON, the images folder)."""
    folder = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--model", str(tiny_ckpt), *QUICK, "--images", str(folder / "images"),
                 "--json", str(folder / "run.json")]) == 0
    return json.loads((folder / "run.json").read_text()), folder / "images"


def test_eval_json_holds_accuracy_per_kind_psnr_time_and_every_record(first_run):
    result, _ = first_run
    assert (result["n"], result["seed"], result["steps"], result["guidance"], result["cache"]) == (4, 0, 2, 2.5, "off")
    assert set(result["accuracy"]) == set(EDITS)
    assert all(value in (0.0, 1.0) for value in result["accuracy"].values())  # one edit of each kind
    assert result["accuracy_all"] == sum(result["accuracy"].values()) / 4
    assert result["untouched_psnr_db"]["min"] <= result["untouched_psnr_db"]["mean"]
    assert result["seconds_per_edit"] > 0
    assert [r["prompt"] for r in result["records"]] == [e.prompt for e in held_out_edits(4)]
    assert [r["kind"] for r in result["records"]] == list(EDITS)
    assert [r["psnr"] is None for r in result["records"]] == [False, False, False, True]  # generate has no input
    assert set(result["records"][0]) == {"prompt", "kind", "correct", "psnr", "found", "steps_skipped"}
    assert result["steps_skipped_mean"] == 0 and all(r["steps_skipped"] == 0 for r in result["records"])
    assert "vs_reference" not in result
    assert result["pipeline"]["backend"] == "torch" and result["pipeline"]["precision"] == "fp32"
    assert set(result["bars_met"]) == {"recolour", "remove", "add", "psnr_db"}


def test_eval_keeps_its_outputs_and_settings_for_a_reference(first_run):
    result, images = first_run
    assert sorted(p.name for p in images.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png", RUN_JSON]
    saved = json.loads((images / RUN_JSON).read_text())
    assert (saved["n"], saved["seed"], saved["steps"], saved["guidance"]) == (4, 0, 2, 2.5)
    assert saved["prompts"] == [r["prompt"] for r in result["records"]]
    assert saved["correct"] == [r["correct"] for r in result["records"]]


def test_a_run_against_itself_is_identical_psnr_capped_ssim_one(first_run, tiny_ckpt, tmp_path, capsys):
    _, images = first_run
    code, out, _ = run_eval(capsys, "--model", tiny_ckpt, *QUICK, "--reference", images, "--json", tmp_path / "r.json")
    assert code == 0
    ref = json.loads((tmp_path / "r.json").read_text())["vs_reference"]
    assert ref == {"reference": str(images), "psnr_db": {"mean": PSNR_CAP, "min": PSNR_CAP},
                   "ssim": {"mean": 1.0, "min": 1.0}, "identical": 4, "same_verdict": 1.0}
    assert "| 99.0 / 99.0 dB | 1.0 / 1.0 | 4 of 4 |" in out


def test_a_bf16_run_against_the_fp32_reference_differs_but_little(first_run, tiny_ckpt, tmp_path, capsys):
    _, images = first_run
    argv = [a if a != "fp32" else "bf16" for a in QUICK]
    code, _, _ = run_eval(capsys, "--model", tiny_ckpt, *argv, "--n", "2", "--reference", images,
                          "--json", tmp_path / "r.json")
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    ref = result["vs_reference"]
    assert result["n"] == 2 and ref["identical"] < 2  # a prefix of the reference's edits; bf16 is not fp32
    assert 10 < ref["psnr_db"]["min"] < PSNR_CAP and 0 < ref["ssim"]["min"] < 1
    assert [r["ref_psnr_db"] for r in result["records"]] and all("ref_ssim" in r for r in result["records"])


@pytest.mark.parametrize("flag,value,words", [("--n", "0", "--n 0: use 1 or more"),
                                              ("--steps", "0", "--steps 0: use 1 or more"),
                                              ("--batch", "-1", "--batch -1: use 1 or more")])
def test_bad_counts_exit_2_with_one_line(flag, value, words, tiny_ckpt, capsys):
    code, _, err = run_eval(capsys, "--model", tiny_ckpt, flag, value)
    assert code == 2
    assert err.strip().count("\n") == 0 and words in err


def test_a_reference_of_other_settings_is_refused_in_one_line(first_run, tiny_ckpt, tmp_path, capsys):
    _, images = first_run
    argv = [a if a != "2" else "3" for a in QUICK]  # --steps 3
    code, _, err = run_eval(capsys, "--model", tiny_ckpt, *argv, "--reference", images)
    assert code == 2 and err.strip().count("\n") == 0
    assert "was run with steps 2, this run with 3" in err
    code, _, err = run_eval(capsys, "--model", tiny_ckpt, *QUICK, "--reference", tmp_path)
    assert code == 2 and f"no {RUN_JSON}" in err and err.strip().count("\n") == 0


def test_write_calib_writes_training_range_pairs_quantize_reads(tmp_path, capsys):
    code, out, _ = run_eval(capsys, "--write-calib", tmp_path / "calib", "--n", "5")
    assert code == 0 and out.strip() == str(tmp_path / "calib")
    entries = read_entries(tmp_path / "calib")
    assert [image.name for image, _ in entries] == [f"{i:04d}.png" for i in range(5)]
    prompts = [prompt for _, prompt in entries]
    assert prompts[0].startswith("make the ") and prompts[1].startswith("remove the ") and \
        prompts[2].startswith("add a ") and prompts[3].startswith("make the ")  # no generate: it has no image
    first = held_out_edits(1)[0]
    assert Image.open(entries[0][0]).convert("RGB").tobytes() != render(first.source).tobytes()
    code, _, err = run_eval(capsys, "--write-calib", tmp_path / "c2", "--seed", str(HELD_OUT_SEED))
    assert code == 2 and "training seeds" in err and err.strip().count("\n") == 0
