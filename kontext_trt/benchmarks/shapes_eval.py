"""`kontext-trt eval`: edit accuracy of a shapes model on held-out scenes, read back from the pixels.

Scenes come from seeds at and above shapes.scenes.HELD_OUT_SEED (training draws below it). The four instruction
kinds take turns; each output is scored by reading its shapes back (shapes.read): correct when the kinds and colours
are the target's and kept shapes stayed put, plus the PSNR of the untouched region against the input. Outputs are
the loop's own pixels (no watermark, no safety check: both would change pixels or time, not the model's edit).

A run can keep its outputs (`images`: DIR/0000.png, ... and DIR/run.json) and compare its outputs with those of an
earlier run of the same edits and seeds (`reference`: another precision, backend or step cache against the
full-precision loop): PSNR (capped at PSNR_CAP dB: identical images are inf) and SSIM per edit, their mean and worst.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from PIL import Image

from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import read_json, write_atomic, write_json
from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.timing import bar
from kontext_trt.runtime.flow import EditRequest, Kontext, edit_batch
from kontext_trt.shapes.read import score
from kontext_trt.shapes.scenes import EDITS, HELD_OUT_SEED, Edit, held_out_edits, make_edit, render

# The bars issue #26 set for the trained model at the default steps on the torch backend.
BARS = {"recolour": 0.90, "remove": 0.80, "add": 0.80, "psnr_db": 28.0}
PSNR_CAP = 99.0  # dB: the PSNR of two identical images (inf) is reported as this
RUN_JSON = "run.json"  # beside a run's images: the settings and prompts a reference comparison checks


def write_calibration(folder: Path, n: int, seed: int = 0) -> Path:
    """n edits with an input image (recolour, remove, add in turn) from training-range seed `seed`, as folder/NNNN.png
    + NNNN.txt pairs: a `kontext-trt quantize --calib` set of the shapes task, never the held-out scenes."""
    if not 0 <= seed < HELD_OUT_SEED:
        raise KontextError(f"--seed {seed}: the calibration scenes come from training seeds, below {HELD_OUT_SEED}",
                           "seed", "out_of_range")
    rng, kinds = random.Random(seed), [kind for kind in EDITS if kind != "generate"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        edit = make_edit(rng, kinds[i % len(kinds)])
        write_atomic(folder / f"{i:04d}.png", lambda tmp, image=render(edit.source): image.save(tmp, format="PNG"))
        write_atomic(folder / f"{i:04d}.txt", edit.prompt + "\n")
    return folder


def request(edit: Edit, index: int, seed: int, steps: int, guidance: float, cache: CacheSpec) -> EditRequest:
    """The pipeline request of one edit: the scene at its own 128x128 size (no auto-resize), its own noise seed."""
    image = None if edit.source is None else render(edit.source)
    return EditRequest(prompts=[edit.prompt], image=image, width=128, height=128, steps=steps, guidance=guidance,
                       seed=seed + index, auto_resize=False, cache=cache)


def evaluate(k: Kontext, n: int = 200, seed: int = 0, steps: int = 28, guidance: float = 2.5,
             cache: CacheSpec = CacheSpec(), batch: int = 8, images: Path | None = None,
             reference: Path | None = None) -> dict:
    """Run n held-out edits through the loop in batches and score them: accuracy per kind and overall, untouched
    PSNR (mean, worst), seconds per edit, and each edit's record. `images`: write the outputs there; `reference`: a
    folder an earlier run wrote its outputs to (same n, seed, steps, guidance), compared with these (vs_reference)."""
    edits = held_out_edits(n, seed)
    prompts = [edit.prompt for edit in edits]
    settings = {"n": n, "seed": seed, "steps": steps, "guidance": guidance}
    ref_images = None if reference is None else read_reference(Path(reference), settings, prompts)
    start = time.perf_counter()
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, edit in enumerate(edits):
        groups[edit.source is not None].append(i)
    order = [chunk for ids in groups.values() for chunk in (ids[j:j + batch] for j in range(0, len(ids), batch))]
    outputs: dict[int, Image.Image] = {}
    skipped: dict[int, int] = {}  # steps the step cache skipped (per batch: the cache decides for the whole batch)
    for chunk in bar(order, "evaluating", unit="batch"):
        reqs = [request(edits[i], i, seed, steps, guidance, cache) for i in chunk]
        for i, result in zip(chunk, edit_batch(k, reqs)):
            outputs[i], skipped[i] = result.images[0], result.metadata["cache"]["steps_skipped"]
    seconds = time.perf_counter() - start
    records = [{"prompt": edits[i].prompt, **score(edits[i], outputs[i]), "steps_skipped": skipped[i]}
               for i in range(n)]
    accuracy = {kind: _mean([r["correct"] for r in records if r["kind"] == kind]) for kind in EDITS}
    psnrs = [r["psnr"] for r in records if r["psnr"] is not None]
    result = {
        **settings, "cache": str(cache),
        "accuracy": accuracy, "accuracy_all": _mean([r["correct"] for r in records]),
        "untouched_psnr_db": {"mean": round(statistics.fmean(psnrs), 2) if psnrs else None,
                              "min": round(min(psnrs), 2) if psnrs else None},
        "seconds_per_edit": round(seconds / max(n, 1), 4),
        "steps_skipped_mean": round(statistics.fmean(skipped.values()), 2),
    }
    if ref_images is not None:
        result["vs_reference"] = compare(records, outputs, ref_images, Path(reference))
    if images is not None:
        save_images(Path(images), outputs, settings, prompts, [r["correct"] for r in records])
    return {**result, "records": records}


def compare(records: list[dict], outputs: dict[int, Image.Image], ref_images: list[Image.Image],
            reference: Path) -> dict:
    """PSNR (capped at PSNR_CAP) and SSIM of each output against the reference run's, added to its record; their
    summary, and how many outputs are identical to the reference's and how many kept its verdict (correct or not)."""
    from kontext_trt.quant.report import image_metrics

    ref_correct = (read_json(reference / RUN_JSON).get("correct") or [])[:len(records)] or None
    for i, record in enumerate(records):
        metrics = image_metrics(ref_images[i], outputs[i])
        record["ref_psnr_db"] = round(min(metrics["psnr_db"], PSNR_CAP), 3)
        record["ref_ssim"] = round(metrics["ssim"], 5)
    psnr, ssim = [r["ref_psnr_db"] for r in records], [r["ref_ssim"] for r in records]
    summary = {"reference": str(reference), "psnr_db": {"mean": round(statistics.fmean(psnr), 2), "min": min(psnr)},
               "ssim": {"mean": round(statistics.fmean(ssim), 4), "min": min(ssim)},
               "identical": sum(p >= PSNR_CAP for p in psnr)}
    if ref_correct is not None:
        summary["same_verdict"] = _mean([r["correct"] == c for r, c in zip(records, ref_correct)])
    return summary


def save_images(folder: Path, outputs: dict[int, Image.Image], settings: dict, prompts: list[str],
                correct: list[bool]) -> None:
    """folder/0000.png, ... and folder/run.json (settings, prompts and each edit's verdict)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in outputs.items():
        write_atomic(folder / f"{i:04d}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
    write_json(folder / RUN_JSON, {**settings, "prompts": prompts, "correct": correct}, indent=1)


def read_reference(folder: Path, settings: dict, prompts: list[str]) -> list[Image.Image]:
    """The outputs an earlier run saved in folder (the first len(prompts)), refused in one line unless it ran the same
    edits and seeds (the same seed, steps and guidance, and n at least this run's)."""
    if not (folder / RUN_JSON).is_file():
        raise KontextError(f"--reference {folder}: no {RUN_JSON}, so no saved run; make one with `kontext-trt eval "
                           f"... --images {folder}`", "reference", "invalid_value")
    saved = read_json(folder / RUN_JSON)
    for name, value in settings.items():
        if saved.get(name) != value and not (name == "n" and isinstance(saved.get(name), int) and saved[name] > value):
            raise KontextError(f"--reference {folder} was run with {name} {saved.get(name)}, this run with {value}: "
                               "compare runs of the same seed, steps and guidance (and n at most the reference's)",
                               "reference", "invalid_value")
    if (saved.get("prompts") or [])[:len(prompts)] != prompts:
        raise KontextError(f"--reference {folder} edited other scenes (another version of the shapes task): run the "
                           "reference again", "reference", "invalid_value")
    images = []
    for i in range(len(prompts)):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            raise KontextError(f"--reference {folder}: {path.name} is missing; run the reference again",
                               "reference", "invalid_value")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def meets_bars(result: dict) -> dict[str, bool]:
    """Each of issue #26's bars: met or not."""
    met = {kind: (result["accuracy"].get(kind) or 0.0) >= bar_ for kind, bar_ in BARS.items() if kind in EDITS}
    met["psnr_db"] = (result["untouched_psnr_db"]["mean"] or 0.0) >= BARS["psnr_db"]
    return met


def table(result: dict) -> str:
    """A Markdown table of one evaluation (with PSNR and SSIM against the reference run when it was compared)."""
    acc, ref = result["accuracy"], result.get("vs_reference")
    head = "| recolour | remove | add | generate | all | untouched PSNR (mean / min) |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    row = (f"| {_pct(acc['recolour'])} | {_pct(acc['remove'])} | {_pct(acc['add'])} | {_pct(acc['generate'])} | "
           f"{_pct(result['accuracy_all'])} | {result['untouched_psnr_db']['mean']} / "
           f"{result['untouched_psnr_db']['min']} dB |")
    if ref is not None:
        head += " PSNR vs reference (mean / min) | SSIM vs reference (mean / min) | identical |"
        rule += "---:|---:|---:|"
        row += (f" {ref['psnr_db']['mean']} / {ref['psnr_db']['min']} dB | {ref['ssim']['mean']} / "
                f"{ref['ssim']['min']} | {ref['identical']} of {result['n']} |")
    return "\n".join([head + " s/edit |", rule + "---:|", row + f" {result['seconds_per_edit']} |"])


def _mean(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"

