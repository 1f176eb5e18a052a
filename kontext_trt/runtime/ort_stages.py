"""The onnxruntime backend: each stage is an exported ONNX file (see export/), same named I/O as the torch adapters.

CPU EP here; on CUDA, the CUDA EP with IO binding: inputs are bound in place from torch CUDA tensors and outputs
are wrapped zero-copy from ORT's buffers (then cloned), so no tensor crosses the PCIe bus between stages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import ExportManifest
from kontext_trt.core.stages import STAGE_IO, TRANSFORMER_PARTS
from kontext_trt.core.weight_map import OnnxWeights

TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
                "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8", torch.int32: "<i4", torch.bool: "|b1"}


def ort_session(path: str | Path, device: torch.device = torch.device("cpu"),
                initializers: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    """An InferenceSession on device's execution provider (CPU as fallback) that runs Q/DQ graphs as written, with
    `initializers` replacing the file's ones of those names (the caller keeps them alive as long as the session)."""
    cuda = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if device.type == "cuda" else []
    options = ort.SessionOptions()
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    options.log_severity_level = 3
    # ORT's QDQ fusions mistake FP8 DequantizeLinear -> MatMul for int8 and refuse the graph: keep Q/DQ as written.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=[*cuda, "CPUExecutionProvider"])


class OrtStage:
    """Adapter: named torch tensors in, named torch tensors out, over one ONNX file in an InferenceSession."""

    def __init__(self, name: str, path: str | Path, device: torch.device | str = "cpu", entry: dict | None = None,
                 io: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
        self.name, self.device, self.path = name, torch.device(device), Path(path)
        self.entry = entry or {}  # the export manifest's entry: its weight map and baked LoRAs
        self.onnx_weights: OnnxWeights | None = None
        self.overrides: dict[str, ort.OrtValue] = {}  # initializers set_weights replaced, alive as long as the session
        self.input_names, self.output_names = io or STAGE_IO[name]  # io: the family's names (core.family)
        try:
            self.session = ort_session(path, self.device)
        except Exception as error:  # onnxruntime raises its own pybind11 types
            raise KontextError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0][:160]}); the "
                               f"onnxruntime backend runs fp32 exports (--dtype fp32), bf16 is for TensorRT") from None
        types = {v.name: v.type for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        unsupported = sorted({t for t in types.values() if t not in TORCH_DTYPES})
        if unsupported:
            raise KontextError(f"{path}: {unsupported[0]} I/O cannot cross from torch to onnxruntime; the "
                               f"onnxruntime backend runs fp32 exports (--dtype fp32), bf16 is for TensorRT")
        names = tuple(v.name for v in self.session.get_inputs()), tuple(v.name for v in self.session.get_outputs())
        if set(names[0]) != set(self.input_names) or set(names[1]) != set(self.output_names):
            raise KontextError(f"{path}: I/O {names} is not the {name} stage's "
                               f"{(self.input_names, self.output_names)}; re-export it")
        self.dtypes = {name: TORCH_DTYPES[t] for name, t in types.items()}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {name: inputs[name].to(self.device, self.dtypes[name]).contiguous() for name in self.input_names}
        if self.device.type == "cuda":
            return self._run_bound(feeds)
        outputs = self.session.run(list(self.output_names), {name: t.numpy() for name, t in feeds.items()})
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outputs)}

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The swappable weights (those of the export's weight map) in torch layout."""
        return self._weights().shapes()

    def base_weight(self, name: str) -> torch.Tensor:
        """A weight as exported, read from the ONNX file."""
        return self._weights().read(name)

    def set_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Recreate the session with these weights fed as initializers (the file is not rewritten); weights not
        named come from the file again."""
        onnx_weights = self._weights()
        values = (onnx_weights.onnx_value(name, value) for name, value in weights)
        overrides = {init: ort.OrtValue.ortvalue_from_numpy(value.numpy()) for init, value in values}
        if overrides or self.overrides:
            self.session = ort_session(self.path, self.device, overrides)
            self.overrides = overrides

    def _weights(self) -> OnnxWeights:
        """The weight map of the export, refused when LoRAs were fused into it for good."""
        if self.entry.get("loras"):
            files = ", ".join(lora["file"] for lora in self.entry["loras"])
            raise KontextError(f"{self.path}: was exported with LoRAs fused in ({files}), so swapping would add to "
                               f"them; export without --lora to swap LoRAs at run time")
        if self.onnx_weights is None:
            self.onnx_weights = OnnxWeights(self.path, self.entry.get("weights"))
        return self.onnx_weights

    @property
    def graph_epoch(self) -> int:
        """Constant: a session's buffers never move under a captured graph."""
        return 0

    def graph_refusal(self) -> str | None:
        """Why runtime.cudagraphs must not capture this stage: a CUDA run waits on the host, which capture forbids."""
        if self.device.type == "cuda":
            return "onnxruntime synchronises with the host around each CUDA run, which a graph capture forbids"
        return None

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA: bind torch buffers as inputs, let ORT allocate outputs on the GPU, wrap and clone them."""
        binding, index = self.session.io_binding(), self.device.index or 0
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", index, np.dtype(TYPESTR[t.dtype]), tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return {name: _wrap_cuda(value, self.dtypes[name], self.device).clone()
                for name, value in zip(self.output_names, binding.get_outputs())}


class _CudaArray:
    """__cuda_array_interface__ over an ORT CUDA buffer, so torch can view it without a copy."""

    def __init__(self, value: ort.OrtValue, dtype: torch.dtype) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(value.shape()), "typestr": TYPESTR[dtype],
                                         "data": (value.data_ptr(), False), "version": 2, "strides": None}


def _wrap_cuda(value: ort.OrtValue, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A torch view of an ORT CUDA output."""
    return torch.as_tensor(_CudaArray(value, dtype), device=device)


def ort_stages(folder: str | Path, manifest: ExportManifest, device: str = "cpu") -> dict[str, OrtStage]:
    """Every stage of the export's family as OrtStage adapters with the family's I/O names (the caller has checked they
    are all in the manifest), and the transformer's parts where exported."""
    family, stages = manifest.family, {}
    for name in [*family.stage_names, *(part for part in TRANSFORMER_PARTS if part in manifest.stages)]:
        path = Path(folder) / manifest.stages[name]["file"]
        if not path.is_file():
            raise KontextError(f"{path}: missing; re-export with `kontext-trt export --out {folder} --stages {name}`")
        stages[name] = OrtStage(name, path, device, manifest.stages[name], family.io(name))
    return stages
