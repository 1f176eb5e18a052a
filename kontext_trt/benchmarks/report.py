"""Results on disk: JSON (checked against bench.schema.json), a Markdown table, PNG plots, comparisons."""
from __future__ import annotations

import json
from pathlib import Path

from kontext_trt.benchmarks.harness import RunConfig
from kontext_trt.core import files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import parse_cache

SCHEMA_PATH = Path(__file__).with_name("bench.schema.json")
SCHEMA_VERSION: int = json.loads(SCHEMA_PATH.read_text())["properties"]["schema_version"]["const"]
STAGE_COLUMNS = (("clip", "clip"), ("t5", "t5"), ("text_encoder", "qwen3"), ("vae_encoder", "vae enc"),
                 ("transformer", "step"), ("vae_decoder", "vae dec"), ("safety_check", "safety"), ("watermark", "mark"))
TEXT_STAGES = ("clip", "t5", "text_encoder")  # one family's text encoders: a column only where a run has them


def stage_columns(runs: list[dict]) -> list[tuple[str, str]]:
    """STAGE_COLUMNS less the text encoders of families none of these runs is."""
    return [(stage, name) for stage, name in STAGE_COLUMNS
            if stage not in TEXT_STAGES or any(stage in run["stages_ms"] for run in runs)]


def validate(results: dict, source: str = "results") -> None:
    """Refuse results that do not match bench.schema.json, in one line."""
    import jsonschema  # the bench extra

    try:
        jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "top level"
        raise KontextError(f"{source} does not match {SCHEMA_PATH.name} at {where}: {exc.message}") from None


def load_results(path: Path) -> dict:
    """Read and validate a results JSON, with one clear line for a file that is not one."""
    results = files.read_json(path, fix="pass a results.json written by `kontext-trt bench run`")
    if results is None:
        raise KontextError(f"benchmark results {path} do not exist: pass a results.json written by "
                           "`kontext-trt bench run`")
    if results.get("schema_version") != SCHEMA_VERSION:
        raise KontextError(f"{path} has schema_version {results.get('schema_version')!r}, this build reads "
                           f"{SCHEMA_VERSION}: re-run the benchmark with this build")
    validate(results, str(path))
    return results


def machine(results: dict) -> str:
    """One line naming the hardware: GPU and driver, else CPU model and cores."""
    s = results["system"]
    if s["gpu"]:
        return f"{s['gpu']['name']} (driver {s['gpu']['driver']}, CUDA {s['cuda']})"
    load = "" if s["load_average"] is None else f", load {s['load_average']:.1f}"
    cores = f"{s['cpu_cores_usable']} of {s['cpu_cores']} cores usable"
    return f"{s['cpu']}, {cores}, torch threads {s['torch_threads']}{load}"


def header(results: dict) -> str:
    """Machine, backend, precision, settings and commit in one line."""
    t, git = results["target"], results["system"]["git"]
    commit = (git["commit"] or "unknown")[:10] + ("+dirty" if git["dirty"] else "")
    return (f"{machine(results)}; {t['backend']} backend, {t['precision']}, {t['device']}; model {t['model']}; "
            f"{results['settings']['warmup']} warm-up + {results['settings']['iters']} timed edits; "
            f"commit {commit}; {results['created']}")


def label(run: dict, sep: str = " ") -> str:
    """A run's configuration as RunConfig.label writes it: `1024x1024 b1 graphs` (bench serve adds `c16`)."""
    cfg = RunConfig(run["width"], run["height"], run["batch"], run["steps"], run["cuda_graphs"],
                    parse_cache(cache_spec(run)), run.get("references", 1))
    load = f" c{run['load']['concurrency']}" if "load" in run else ""
    return cfg.label.replace(" ", sep, 1) + load


def cache_spec(run: dict) -> str:
    """A run's step cache spec (off for results written before step caching)."""
    return run.get("cache", {}).get("spec", "off")


def steps_cell(run: dict) -> str:
    """Steps, and how many reused the cached residual: `28 (12 reused)`."""
    skipped = run.get("cache", {}).get("steps_skipped", 0)
    return f"{run['steps']}" + (f" ({skipped} reused)" if skipped else "")


def gib(n: int | None) -> str:
    """Bytes as GiB with 2 decimals, or a dash."""
    return "-" if n is None else f"{n / 2**30:.2f}"


def p50(run: dict, stage: str) -> str:
    """A stage's p50 in ms for a table cell; '-' where the run has no such stage (a text-to-image run has no
    vae_encoder, an image under 256x256 no watermark, a run without checker no safety check)."""
    stats = run["stages_ms"].get(stage)
    return "-" if stats is None else f"{stats['p50']:.1f}"


def markdown(results: dict) -> str:
    """A Markdown table: one row per configuration, p50 per stage, e2e percentiles, roofline and memory."""
    columns = stage_columns(results["runs"])
    head = (["config", "steps", "e2e p50 ms", "e2e p95 ms", "img/s"] + [f"{c} p50 ms" for _, c in columns]
            + ["step p95 ms", "TFLOP/s", "MFU", "dev peak GiB", "host RSS GiB"])
    rows = [head, ["---"] * len(head)]
    for run in results["runs"]:
        roof, mem = run["roofline"], run["memory"]
        rows.append([label(run), steps_cell(run), f"{run['e2e_ms']['p50']:.1f}", f"{run['e2e_ms']['p95']:.1f}",
                     f"{run['images_per_s']:.2f}"]
                    + [p50(run, s) for s, _ in columns]
                    + [f"{run['stages_ms']['transformer']['p95']:.1f}",
                       "-" if roof is None else f"{roof['tflops']:.3f}",
                       "-" if roof is None or roof["mfu"] is None else f"{100 * roof['mfu']:.1f}%",
                       gib(mem["device_peak_allocated_bytes"]), gib(mem["host_peak_rss_bytes"])])
    loads = [f"- {label(run)}: {run['load']['requests']} requests, statuses {run['load']['statuses']}, "
             f"{run['load']['requests_per_s']:.2f} req/s, e2e p99 {run['e2e_ms']['p99']:.1f} ms, mean server batch "
             f"{run['load']['mean_server_batch']:.2f}"
             for run in results["runs"] if "load" in run]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return (f"{header(results)}\n\n{table}\n" + ("\n" + "\n".join(loads) + "\n" if loads else "")
            + quality_table(results["runs"]))


def quality_table(runs: list[dict]) -> str:
    """Markdown of the --quality figures of cached runs against uncached (empty without any)."""
    rows = [[label(r), steps_cell(r), "identical" if r["quality"]["psnr_db"] is None else f"{r['quality']['psnr_db']:.2f}",
             f"{r['quality']['ssim']:.4f}", f"{r['quality']['cosine_min']:.5f}"] for r in runs if "quality" in r]
    if not rows:
        return ""
    head = ["config", "steps", "PSNR dB vs off", "SSIM vs off", "worst step cosine"]
    return "\nStep cache quality (same seed, uncached as reference):\n\n" + "\n".join(
        "| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows]) + "\n"


def run_key(run: dict) -> tuple:
    """What makes two runs comparable: size, batch, steps, CUDA graphs, step cache, references (and bench serve's
    concurrency)."""
    return (run["width"], run["height"], run["batch"], run["steps"], run["cuda_graphs"], cache_spec(run),
            run.get("references", 1), run.get("load", {}).get("concurrency"))


def compare(a: dict, b: dict) -> str:
    """Markdown: for each configuration in both, B/A of the p50 per stage and end to end (< 1: B is faster)."""
    runs_a = {run_key(r): r for r in a["runs"]}
    runs_b = {run_key(r): r for r in b["runs"]}
    columns = stage_columns(a["runs"] + b["runs"])
    head = ["config", "e2e B/A"] + [f"{c} B/A" for _, c in columns] + ["img/s B/A"]
    rows = [head, ["---"] * len(head)]
    for key in [k for k in runs_a if k in runs_b]:
        ra, rb = runs_a[key], runs_b[key]
        ratios = [rb["e2e_ms"]["p50"] / ra["e2e_ms"]["p50"]]
        ratios += [rb["stages_ms"][s]["p50"] / ra["stages_ms"][s]["p50"] if s in ra["stages_ms"] and
                   s in rb["stages_ms"] else float("nan") for s, _ in columns]
        ratios += [rb["images_per_s"] / ra["images_per_s"]]
        rows.append([f"{label(ra)}, {ra['steps']} steps"] + ["-" if r != r else f"{r:.3f}" for r in ratios])
    if len(rows) == 2:
        raise KontextError("the two results share no configuration (size, batch, steps, CUDA graphs)")
    lines = [f"A: {header(a)}", f"B: {header(b)}", "", *("| " + " | ".join(row) + " |" for row in rows)]
    only = [f"only in {name}: " + ", ".join(label(runs[k]) for k in sorted(keys, key=str))
            for name, runs, keys in (("A", runs_a, runs_a.keys() - runs_b.keys()),
                                     ("B", runs_b, runs_b.keys() - runs_a.keys())) if keys]
    return "\n".join(lines + ([""] + only if only else [])) + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    """Two PNGs: stacked per-stage time per edit for each configuration; latency against resolution."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t = results["target"]
    runs, title = results["runs"], f"{machine(results)}\n{t['backend']} {t['precision']}, model {t['model']}"
    labels = [label(r, "\n") for r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(runs) + 2), 4), dpi=100)
    bottom = [0.0] * len(runs)
    for stage in [s for s, _ in stage_columns(runs)] + ["other"]:
        heights = [r["breakdown_ms"].get(stage, 0.0) for r in runs]
        ax.bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per edit (mean)")
    ax.set_title(f"per-stage time per edit, {runs[0]['steps']} steps; {title}", fontsize=8)
    ax.legend(fontsize=7)
    paths = [out / "stages.png"]
    fig.tight_layout()
    files.write_atomic(paths[0], lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    series = sorted({(r["batch"], r["cuda_graphs"], cache_spec(r)) for r in runs})
    for batch, graphs, cache in series:
        pts = sorted((r for r in runs if (r["batch"], r["cuda_graphs"], cache_spec(r)) == (batch, graphs, cache)),
                     key=lambda r: r["width"] * r["height"])
        megapixels = [r["width"] * r["height"] / 1e6 for r in pts]
        name = f"b{batch}" + (" graphs" if graphs else "") + ("" if cache == "off" else f" {cache}")
        left.plot(megapixels, [r["e2e_ms"]["p50"] for r in pts], marker="o", label=name)
        right.plot(megapixels, [r["stages_ms"]["transformer"]["p50"] for r in pts], marker="o", label=name)
    for ax, what in ((left, "end to end p50 ms"), (right, "transformer step p50 ms")):
        ax.set_xlabel("output megapixels (input image the same size)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    paths.append(out / "resolution.png")
    fig.tight_layout()
    files.write_atomic(paths[1], lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return paths


def write_all(results: dict, out: Path) -> list[Path]:
    """Validate, then write results.json, results.md, stages.png and resolution.png into out."""
    validate(results)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "results.json", results)
    files.write_atomic(out / "results.md", markdown(results))
    return [out / "results.json", out / "results.md", *plot(results, out)]
