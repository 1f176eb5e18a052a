"""Where each transformer weight lies in its exported ONNX: diffusers parameter name -> initializer name and layout.

The exporter keeps some parameters under their own name (model.<name>) and folds the transpose of a linear layer's
(out, in) weight into a new initializer (val_123, (in, out)) for MatMul. The map is worked out once, at export, by
content: each parameter's signature (the bits of 3 rows and 3 columns) against the initializers of its shape or its
transposed shape; a parameter whose signature matches no or several initializers is left out. It is recorded in the
export manifest (stages.<transformer or part>.weights); onnxruntime swaps initializers and TensorRT refits weights (the parser
names them after the initializers) through it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from kontext_trt.core.errors import KontextError

PREFIX = "model."  # the adapter module (runtime.torch_stages.TransformerModule) wraps the diffusers model as .model
FLOATS = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
BITS = {4: torch.int32, 2: torch.int16}


def signature(bits: torch.Tensor) -> str:
    """A weight's signature, from its bits in torch layout: all of a vector, 3 rows and 3 columns of a matrix."""
    if bits.ndim == 2:
        rows, cols = _picks(bits.shape[0]), _picks(bits.shape[1])
        bits = torch.cat([bits[rows, :].flatten(), bits[:, cols].flatten()])
    return hashlib.sha256(bits.contiguous().numpy().tobytes()).hexdigest()


def _picks(n: int) -> list[int]:
    """First, middle and last index of a dimension."""
    return sorted({0, n // 2, n - 1})


def param_signatures(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter name: (shape, signature)} of a model's vectors and matrices (taken before the module is freed)."""
    out = {}
    for name, p in model.named_parameters():
        if p.ndim in (1, 2) and p.dtype in FLOATS.values():
            out[name] = (tuple(p.shape), signature(p.detach().view(BITS[p.element_size()])))
    return out


def weight_map(signatures: dict[str, tuple[tuple[int, ...], str]], onnx_path: Path,
               kept: dict[str, str] | None = None) -> dict[str, dict]:
    """{diffusers parameter name: {"name": initializer, "transpose": whether it holds the (in, out) transpose}}.
    `kept`: the initializer name the exporter keeps each parameter under when it keeps its own (default
    model.<name>, the transformer's; a step-cache part's are its module's own names)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer if t.data_type in FLOATS and len(t.dims) in (1, 2)}
    found, taken = {}, set()
    for name, (shape, _) in signatures.items():  # kept under its own name: no need to read it
        init = inits.get((kept or {}).get(name, PREFIX + name))
        if init is not None and tuple(init.dims) == shape:
            found[name] = {"name": init.name, "transpose": False}
            taken.add(init.name)
    index: dict[tuple, list[tuple[str, bool]]] = {}
    for init in inits.values():
        if init.name in taken:
            continue
        dims, bits = tuple(init.dims), init_bits(init, onnx_path.parent)
        orientations = [(dims, False)] + ([(dims[::-1], True)] if len(dims) == 2 else [])
        for shape, transpose in orientations:
            index.setdefault((shape, signature(bits.T if transpose else bits)), []).append((init.name, transpose))
    for name, (shape, sig) in signatures.items():
        hits = index.get((shape, sig), []) if name not in found else []
        if len(hits) == 1:
            found[name] = {"name": hits[0][0], "transpose": hits[0][1]}
    return dict(sorted(found.items()))


def init_bits(init: TensorProto, folder: Path) -> torch.Tensor:
    """An initializer's elements as integers of their size (bits, no conversion), in its ONNX layout; external data
    is memory-mapped, not read."""
    dtype = FLOATS[init.data_type]
    bits = np.dtype(f"<i{dtype.itemsize}")
    shape = tuple(init.dims)
    if init.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        # copy-on-write: writable for torch, and only the pages read are loaded
        return torch.from_numpy(np.memmap(folder / info["location"], bits, "c", int(info.get("offset", 0)), shape))
    if init.raw_data:
        return torch.from_numpy(np.frombuffer(init.raw_data, bits).reshape(shape).copy())
    return torch.from_numpy(onnx.numpy_helper.to_array(init).astype(str(dtype).removeprefix("torch.")).view(bits))


class OnnxWeights:
    """The mapped transformer weights of one exported ONNX file, read and written in torch layout by diffusers name."""

    def __init__(self, onnx_path: Path, weights: dict[str, dict] | None) -> None:
        if not weights:
            raise KontextError(f"{onnx_path}: its export manifest has no weight map for it (its stage's `weights`), so "
                               f"its weights cannot be swapped; re-export it with this version of kontext-trt export")
        self.path, self.map = Path(onnx_path), weights
        model = onnx.load(str(onnx_path), load_external_data=False)
        self.inits = {t.name: t for t in model.graph.initializer if t.name in {w["name"] for w in weights.values()}}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every mapped weight's shape in torch layout."""
        return {name: self._shape(name) for name in self.map}

    def read(self, name: str) -> torch.Tensor:
        """The weight as exported, in torch layout and its ONNX dtype."""
        entry = self.map[name]
        init = self.inits[entry["name"]]
        value = init_bits(init, self.path.parent).view(FLOATS[init.data_type])
        return value.T.contiguous() if entry["transpose"] else value

    def onnx_value(self, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(initializer name, value in its ONNX layout and dtype, contiguous, on the CPU) for a torch-layout value."""
        entry = self.map[name]
        value = value.detach().to("cpu", FLOATS[self.inits[entry["name"]].data_type])
        return entry["name"], (value.T if entry["transpose"] else value).contiguous()

    def read_initializer(self, init_name: str) -> torch.Tensor:
        """Any float initializer of the file by its own name, in its ONNX layout and dtype (mapped or not: a refit
        also needs the weights TensorRT combined with a mapped one)."""
        if init_name not in self.inits:
            model = onnx.load(str(self.path), load_external_data=False)
            found = next((t for t in model.graph.initializer if t.name == init_name and t.data_type in FLOATS), None)
            if found is None:
                raise KontextError(f"{self.path}: has no float initializer {init_name}, which the engine asks for: "
                                   "rebuild the engine from this export")
            self.inits[init_name] = found
        init = self.inits[init_name]
        return init_bits(init, self.path.parent).view(FLOATS[init.data_type])

    def _shape(self, name: str) -> tuple[int, ...]:
        dims = tuple(self.inits[self.map[name]["name"]].dims)
        return dims[::-1] if self.map[name]["transpose"] else dims
