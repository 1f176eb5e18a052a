"""`kontext-trt check`: run each engine and its ONNX (ONNX Runtime) on the same random inputs and report the max and
mean error of every output.

The engine takes the inputs in its own dtypes (polygraphy's TrtRunner, torch tensors); ONNX Runtime takes them as
numpy. A bf16 stage is compared with the same graph in fp32 (engines.onnx_cast): ONNX Runtime's CPU kernels have no
bf16 MatMul or Conv, and numpy no bfloat16. Its inputs are drawn in bf16, so both sides see the very same numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kontext_trt.core.onnx_dir import OnnxDir
from kontext_trt.engines import onnx_cast, trt_api
from kontext_trt.engines.cache import Engines

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TOKEN_VOCAB = 100  # random ids stay inside every vocabulary, the tiny test models' included
TORCH_DTYPES = {"float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
                "int32": torch.int32, "bool": torch.bool}


def random_feed(shapes: dict[str, list[int]], dtypes: dict[str, str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs in the ranges the pipeline feeds, as CPU torch tensors of each input's ONNX dtype: token ids,
    timestep/guidance in [0, 1], position ids, images in [-1, 1], normal latents and embeddings."""
    rng = np.random.default_rng(seed)
    feed = {}
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
        feed[name] = torch.from_numpy(value).to(TORCH_DTYPES[dtypes[name]])
    return feed


def onnx_outputs(path: Path, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Run an ONNX file in ONNX Runtime (bf16 graphs as their fp32 copy) on a feed; float32 outputs by name."""
    import onnxruntime as ort

    with onnx_cast.fp32_copy(path) as runnable:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_quant_qdq", "1")  # Q/DQ as written (see ort_stages)
        available = ort.get_available_providers()
        session = ort.InferenceSession(str(runnable), options, providers=[p for p in PROVIDERS if p in available])
        names = [o.name for o in session.get_outputs()]
        ins = {v.name: torch.float32 if v.type == "tensor(float)" else None for v in session.get_inputs()}
        arrays = {name: (t.to(ins[name]) if ins[name] is not None else t).numpy() for name, t in feed.items()}
        return {name: np.asarray(out, np.float32) for name, out in zip(names, session.run(names, arrays))}


def engine_outputs(api: trt_api.TrtApi, plan: Path, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Run an engine plan through polygraphy's TrtRunner on a feed in the engine's dtypes; float32 outputs by name."""
    with trt_api.polygraphy_runner(api, plan) as runner:
        outputs = runner.infer(feed)
    return {name: (out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32))
            for name, out in outputs.items()}


def compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], atol: float, rtol: float) -> list[dict]:
    """Per reference output: max/mean absolute error, max relative error, and whether every element is within
    atol + rtol * |reference|."""
    rows = []
    for name, ref in reference.items():
        if name not in outputs:
            rows.append({"output": name, "error": "the engine has no such output"})
            continue
        diff = np.abs(outputs[name].astype(np.float64) - ref)
        rel = diff / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
        rows.append({"output": name, "max_abs": float(diff.max(initial=0)), "mean_abs": float(diff.mean()),
                     "max_rel": float(rel.max(initial=0)), "passed": bool(np.all(diff <= atol + rtol * np.abs(ref)))})
    return rows


def check_engines(engines: Engines, onnx: OnnxDir, api: trt_api.TrtApi, atol: float = 1e-2,
                  rtol: float = 1e-2) -> list[dict]:
    """Compare every engine of a set with ONNX Runtime at its profile's opt shape; one row per output (or error)."""
    rows = []
    for stage, plan in engines.plans.items():
        entry = engines.manifest.stages[stage]
        source = next((s.path for s in onnx.stages.get(stage, {}).values() if s.sha256 == entry["onnx_sha256"]), None)
        if source is None:
            rows.append({"stage": stage, "output": "-", "error": f"no ONNX in {onnx.root} matches the one the engine "
                                                                 f"was built from ({entry['onnx_file']}): rebuild"})
            continue
        shapes = {name: p["opt"] for name, p in entry["profile"].items()}
        feed = random_feed(shapes, {n: i["dtype"] for n, i in entry["inputs"].items()})
        try:
            reference = onnx_outputs(source, feed)
            rows += [{"stage": stage, **row}
                     for row in compare(reference, engine_outputs(api, plan, feed), atol, rtol)]
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
