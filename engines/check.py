"""`kontext-trt check`: run each engine and its ONNX (ONNX Runtime) on the same random inputs with polygraphy's
Comparator and report the max and mean error of every output."""
from __future__ import annotations

from typing import Any

import numpy as np

from kontext_trt.engines import trt_api
from kontext_trt.engines.cache import Engines
from kontext_trt.engines.onnx_dir import OnnxDir

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TOKEN_VOCAB = 100  # random ids stay inside every vocabulary, the tiny test models' included


def random_feed(shapes: dict[str, list[int]], dtypes: dict[str, str], seed: int = 0) -> dict[str, Any]:
    """Inputs in the ranges the pipeline feeds: token ids, timestep/guidance in [0, 1], position ids, images in
    [-1, 1], normal latents and embeddings; bf16 inputs become torch tensors (numpy has no bfloat16)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name == "input_ids":
            value = rng.integers(0, TOKEN_VOCAB, shape)
        elif name in ("timestep", "guidance"):
            value = rng.uniform(0, 1, shape)
        elif name.endswith("_ids"):
            value = rng.integers(0, 64, shape)
        elif name == "images":
            value = rng.uniform(-1, 1, shape)
        else:
            value = rng.standard_normal(shape)
        if dtypes[name] == "bfloat16":
            import torch

            feed[name] = torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
        else:
            feed[name] = value.astype({"float": np.float32, "float16": np.float16}.get(dtypes[name], dtypes[name]))
    return feed


def compare_runners(runners: list, feed: dict[str, Any], atol: float, rtol: float) -> list[dict]:
    """Run two polygraphy runners on one feed; per output: max/mean absolute error, max relative error, verdict."""
    from polygraphy import comparator
    from polygraphy.logger import G_LOGGER

    # SimpleCompareFunc replaces CompareFunc.simple from polygraphy 0.53 on; older images only have the latter.
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = comparator.Comparator.run(runners, data_loader=[feed])
        accuracy = comparator.Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol))
    (per_output,) = next(iter(accuracy[0].values()))
    return [{"output": name, "max_abs": r.max_absdiff, "mean_abs": r.mean_absdiff, "max_rel": r.max_reldiff,
             "passed": bool(r)} for name, r in per_output.items()]


def check_engines(engines: Engines, onnx: OnnxDir, api: trt_api.TrtApi, atol: float = 1e-2,
                  rtol: float = 1e-2) -> list[dict]:
    """Compare every engine of a set with ONNX Runtime at its profile's opt shape; one row per output (or error)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    rows = []
    for stage, plan in engines.plans.items():
        entry = engines.manifest["stages"][stage]
        source = next((s.path for s in onnx.stages.get(stage, {}).values() if s.sha256 == entry["onnx_sha256"]), None)
        if source is None:
            rows.append({"stage": stage, "output": "-", "error": f"no ONNX in {onnx.root} matches the one the engine "
                                                                 f"was built from ({entry['onnx_file']}): rebuild"})
            continue
        shapes = {name: p["opt"] for name, p in entry["profile"].items()}
        feed = random_feed(shapes, {n: i["dtype"] for n, i in entry["inputs"].items()})
        reference = OnnxrtRunner(SessionFromOnnx(str(source), providers=PROVIDERS), name="onnxrt")
        try:
            engine = trt_api.polygraphy_runner(api, plan)
            rows += [{"stage": stage, **row} for row in compare_runners([reference, engine], feed, atol, rtol)]
        except Exception as exc:  # a failing stage (e.g. ORT lacks a TensorRT quantization op) must not hide the rest
            rows.append({"stage": stage, "output": "-", "error": f"{exc.__class__.__name__}: {exc}"})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The check report as a text table."""
    lines = [f"{'stage':<13}{'output':<19}{'max abs':>11}{'mean abs':>11}{'max rel':>11}  verdict"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['stage']:<13}{r['output']:<19}{'':>33}  error: {r['error']}")
        else:
            lines.append(f"{r['stage']:<13}{r['output']:<19}{r['max_abs']:>11.3g}{r['mean_abs']:>11.3g}"
                         f"{r['max_rel']:>11.3g}  {'ok' if r['passed'] else 'FAIL'}")
    return "\n".join(lines)
