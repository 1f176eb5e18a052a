"""TensorRT engine I/O for the runtime: each binding's name, direction, dtype and profile range, checked against the
stage contract, and the inputs of a call cast to each binding's dtype (BFL's ONNX takes int32 ids and a bf16
timestep; ours int64 and float: the engine says which)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.stages import STAGE_IO

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: direction, torch dtype, shape (-1: dynamic) and, for inputs, the profile's min and max."""

    name: str
    is_input: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    min: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None


def engine_io(engine: Any) -> dict[str, TensorSpec]:
    """The I/O tensors of a deserialized engine (profile 0), in engine order."""
    specs = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name).name == "INPUT"
        kind = engine.get_tensor_dtype(name).name
        if kind not in TORCH_DTYPES:
            raise KontextError(f"engine tensor {name} is {kind}, which torch cannot hold: rebuild the engine from an "
                               "ONNX with float, bf16, fp16 or integer I/O")
        lo = hi = None
        if is_input:
            lo, _, hi = (tuple(dims) for dims in engine.get_tensor_profile_shape(name, 0))
        specs[name] = TensorSpec(name, is_input, TORCH_DTYPES[kind], tuple(engine.get_tensor_shape(name)), lo, hi)
    return specs


StageIO = tuple[tuple[str, ...], tuple[str, ...]]


def check_io(stage: str, specs: dict[str, TensorSpec], where: str | Path, io: StageIO | None = None) -> None:
    """Refuse an engine whose I/O is not the stage contract: `io` (a family's, core.family.Family.io), else FLUX.1's
    (guidance may be absent: no guidance embedding)."""
    ins, outs = io or STAGE_IO[stage]
    inputs = {n for n, s in specs.items() if s.is_input}
    outputs = {n for n, s in specs.items() if not s.is_input}
    if not set(ins) - {"guidance"} <= inputs <= set(ins) or not set(outs) <= outputs:
        raise KontextError(f"{where}: engine I/O ({', '.join(sorted(inputs))} -> {', '.join(sorted(outputs))}) is not "
                           f"the {stage} stage's ({', '.join(ins)} -> {', '.join(outs)}): rebuild it from this export")


def check_shape(stage: str, spec: TensorSpec, shape: tuple[int, ...], rebuild: str) -> None:
    """Refuse an input shape outside the engine's profile, saying which axis and how to rebuild."""
    if len(shape) != len(spec.shape):
        raise KontextError(f"{stage}: input {spec.name} has rank {len(shape)}, the engine takes {list(spec.shape)}")
    for axis, (value, lo, hi) in enumerate(zip(shape, spec.min, spec.max)):
        if not lo <= value <= hi:
            raise KontextError(f"{stage}: input {spec.name} {list(shape)} is outside the engine profile on axis {axis} "
                               f"({value} not in {lo}..{hi}): build engines that cover this size and batch "
                               f"(--sizes/--batch), e.g. {rebuild}")


def plan_inputs(stage: str, specs: dict[str, TensorSpec], inputs: dict[str, torch.Tensor], device: torch.device,
                rebuild: str = "kontext-trt build") -> dict[str, torch.Tensor]:
    """Each engine input as a contiguous tensor of the engine's dtype on device (the caller's own tensor where it
    already is one), its shape checked against the profile."""
    feeds = {}
    for name, spec in specs.items():
        if not spec.is_input:
            continue
        if name not in inputs:
            raise KontextError(f"{stage}: the engine needs input {name}, which the loop did not pass")
        feeds[name] = inputs[name].to(device, spec.dtype).contiguous()
        check_shape(stage, spec, tuple(feeds[name].shape), rebuild)
    return feeds
