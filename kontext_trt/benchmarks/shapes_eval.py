"""`kontext-trt eval`: edit accuracy of a shapes model on held-out scenes, read back from the pixels.

Scenes come from seeds at and above shapes.scenes.HELD_OUT_SEED (training draws below it). The four instruction
kinds take turns; each output is scored by reading its shapes back (shapes.read): correct when the kinds and colours
are the target's and kept shapes stayed put, plus the PSNR of the untouched region against the input. Outputs are
the loop's own pixels (no watermark, no safety check: both would change pixels or time, not the model's edit).
"""
from __future__ import annotations

import random
import statistics
import time

from kontext_trt.core.specs import CacheSpec
from kontext_trt.core.timing import bar
from kontext_trt.runtime.flow import EditRequest, Kontext, edit_batch
from kontext_trt.shapes.read import score
from kontext_trt.shapes.scenes import EDITS, HELD_OUT_SEED, Edit, make_edit, render

# The bars issue #26 set for the trained model at the default steps on the torch backend.
BARS = {"recolour": 0.90, "remove": 0.80, "add": 0.80, "psnr_db": 28.0}


def held_out_edits(n: int, seed: int = 0) -> list[Edit]:
    """n edits, the four kinds in turn, from held-out seed HELD_OUT_SEED + seed."""
    rng = random.Random(HELD_OUT_SEED + seed)
    return [make_edit(rng, EDITS[i % len(EDITS)]) for i in range(n)]


def request(edit: Edit, index: int, seed: int, steps: int, guidance: float, cache: CacheSpec) -> EditRequest:
    """The pipeline request of one edit: the scene at its own 128x128 size (no auto-resize), its own noise seed."""
    image = None if edit.source is None else render(edit.source)
    return EditRequest(prompts=[edit.prompt], image=image, width=128, height=128, steps=steps, guidance=guidance,
                       seed=seed + index, auto_resize=False, cache=cache)


def evaluate(k: Kontext, n: int = 200, seed: int = 0, steps: int = 28, guidance: float = 2.5,
             cache: CacheSpec = CacheSpec(), batch: int = 8) -> dict:
    """Run n held-out edits through the loop in batches and score them: accuracy per kind and overall, untouched
    PSNR (mean, worst), seconds per edit, and each edit's record."""
    edits = held_out_edits(n, seed)
    start = time.perf_counter()
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, edit in enumerate(edits):
        groups[edit.source is not None].append(i)
    order = [chunk for ids in groups.values() for chunk in (ids[j:j + batch] for j in range(0, len(ids), batch))]
    scored: dict[int, dict] = {}
    for chunk in bar(order, "evaluating", unit="batch"):
        reqs = [request(edits[i], i, seed, steps, guidance, cache) for i in chunk]
        for i, result in zip(chunk, edit_batch(k, reqs)):
            scored[i] = {"prompt": edits[i].prompt, **score(edits[i], result.images[0])}
    records = [scored[i] for i in range(n)]
    seconds = time.perf_counter() - start
    accuracy = {kind: _mean([r["correct"] for r in records if r["kind"] == kind]) for kind in EDITS}
    psnrs = [r["psnr"] for r in records if r["psnr"] is not None]
    return {
        "n": n, "seed": seed, "steps": steps, "guidance": guidance, "cache": str(cache),
        "accuracy": accuracy, "accuracy_all": _mean([r["correct"] for r in records]),
        "untouched_psnr_db": {"mean": round(statistics.fmean(psnrs), 2) if psnrs else None,
                              "min": round(min(psnrs), 2) if psnrs else None},
        "seconds_per_edit": round(seconds / max(n, 1), 4), "records": records,
    }


def meets_bars(result: dict) -> dict[str, bool]:
    """Each of issue #26's bars: met or not."""
    met = {kind: (result["accuracy"].get(kind) or 0.0) >= bar_ for kind, bar_ in BARS.items() if kind in EDITS}
    met["psnr_db"] = (result["untouched_psnr_db"]["mean"] or 0.0) >= BARS["psnr_db"]
    return met


def table(result: dict) -> str:
    """A Markdown table of one evaluation."""
    acc = result["accuracy"]
    rows = ["| recolour | remove | add | generate | all | untouched PSNR (mean / min) | s/edit |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {_pct(acc['recolour'])} | {_pct(acc['remove'])} | {_pct(acc['add'])} | {_pct(acc['generate'])} | "
            f"{_pct(result['accuracy_all'])} | {result['untouched_psnr_db']['mean']} / "
            f"{result['untouched_psnr_db']['min']} dB | {result['seconds_per_edit']} |"]
    return "\n".join(rows)


def _mean(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"

