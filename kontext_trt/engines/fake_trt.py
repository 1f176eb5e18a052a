"""Stand-ins for TensorRT's Python bindings, for tests on a host without a GPU (or without datacenter TensorRT).

Honest per flavour: every public name a fake has exists on the real binding of the flavours it stands for
(tests/engines/test_fake_conformance.py checks them against `tensorrt_rtx` itself and, for datacenter TensorRT,
against engines/trt_names.DATACENTER), so code that calls a name one flavour lacks fails under that flavour's fake.
The fakes' own records (what was set, how often it ran) live under names starting with "_".

- FakeEngine, FakeContext, FakeRefitter, FakeWeights: ICudaEngine, IExecutionContext, Refitter and Weights of both
  flavours; FakeRtxContext adds is_stream_capturable, which only TensorRT-RTX has.
- fake_tensorrt(version): a stand-in datacenter `tensorrt` module (10.x or 11.x) with the builder surface engines/
  uses (recording what a build asks of it in `_calls`) and the runtime enums, Refitter and Weights.
- FakeStream: torch.cuda.Stream's ordering surface (checked against torch.cuda.Stream).
- network_engine(onnx, entry): a FakeEngine with the I/O TensorRT-RTX parses from a stage's ONNX and the profile an
  engine manifest records; OnnxContext: a FakeRtxContext that really computes, with the stage's ONNX in onnxruntime.
"""
from __future__ import annotations

import ctypes
import enum
import types
from pathlib import Path
from typing import Any, Callable

import torch

# (is_input, dtype with a .name such as FLOAT, shape with -1 for dynamic axes), by tensor name
TensorIO = dict[str, tuple[bool, Any, tuple[int, ...]]]
ITEM_BYTES = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1}


class FakeEngine:
    """ICudaEngine: I/O names, modes, dtypes, shapes and profile 0; device memory; weight streaming; weight stats.

    Scratch need: `_scratch`, plus `_streaming_scratch(budget)` once a weight-streaming budget is set. Refit state:
    `_refittable` (the weights a Refitter takes), `_combined` (name -> weights TensorRT refits together with it),
    `_weights` (the values refit so far, as bytes) and `_refits` (each refit's names and stream)."""

    _binding = "ICudaEngine"

    def __init__(self, trt: Any, io: TensorIO, profile: dict, scratch: int = 4096, streamable: int = 0,
                 total_weights: int = 0) -> None:
        self._trt, self._io, self._profile, self._scratch = trt, io, profile, scratch
        self._capturable: bool | str = True  # FakeRtxContext: True, False or "after_run"
        self._streaming_scratch: Callable[[int], int] = lambda budget: 0
        self._total_weights = total_weights
        self._refittable: set[str] = set()
        self._combined: dict[str, tuple[str, ...]] = {}
        self._weights: dict[str, bytes] = {}
        self._refits: list[tuple[list[str], int]] = []
        self._peak_staged = 0  # most host bytes set on one Refitter before a refit
        self.streamable_weights_size = streamable
        self.weight_streaming_budget_v2 = -1  # -1: never set (the real one reports the streamable size)
        self.num_io_tensors = len(io)

    @property
    def device_memory_size_v2(self) -> int:
        budget = self.weight_streaming_budget_v2
        return self._scratch + (self._streaming_scratch(budget) if budget >= 0 else 0)

    def get_tensor_name(self, index: int) -> str:
        return list(self._io)[index]

    def get_tensor_mode(self, name: str) -> Any:
        return self._trt.TensorIOMode.INPUT if self._io[name][0] else self._trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return self._io[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        return [self._profile[name][key] for key in ("min", "opt", "max")]

    def get_engine_stat(self, stat: Any) -> int:
        return self._total_weights if stat.name == "TOTAL_WEIGHTS_SIZE" else 0


class FakeContext:
    """IExecutionContext of both flavours: records the device memory, shapes and addresses set, infers the
    transformer's and the decoder's output shapes, and counts its runs."""

    _binding = "IExecutionContext"

    def __init__(self, engine: FakeEngine, native_graphs: bool = False) -> None:
        self._engine, self._native_graphs = engine, native_graphs
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None
        self._runs = self._bindings = 0

    def set_device_memory(self, memory: int, size: int) -> None:
        self._memory = (memory, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self._shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._addresses[name] = memory
        self._bindings += 1
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name == "latent":
            return self._shapes["hidden_states"]
        b, _, h, w = self._shapes["latent"]
        return (b, 3, 8 * h, 8 * w)

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._runs += 1
        return True


class FakeRtxContext(FakeContext):
    """A TensorRT-RTX execution context: it also answers is_stream_capturable (the engine's `_capturable`: True,
    False, or "after_run": not before its first enqueue)."""

    _flavors = ("tensorrt-rtx",)

    def is_stream_capturable(self, stream: int) -> bool:
        capturable = self._engine._capturable
        return self._runs > 0 if capturable == "after_run" else bool(capturable)


class OnnxContext(FakeRtxContext):
    """A context that computes, on host memory: when its outputs are bound (TrtStage binds them after the inputs,
    right before each run) it runs the engine's `_session` (onnxruntime over the stage's ONNX) on the tensors bound
    as inputs, read at their addresses with the engine's dtypes and shapes set; a run writes those outputs at the
    addresses bound for them."""

    def __init__(self, engine: FakeEngine, native_graphs: bool = False) -> None:
        super().__init__(engine, native_graphs)
        self._outputs: dict[str, torch.Tensor] | None = None

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self._outputs = self._outputs or self._compute()
        return tuple(self._outputs[name].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        outputs, self._outputs = self._outputs or self._compute(), None
        for name, value in outputs.items():
            ctypes.memmove(self._addresses[name], value.data_ptr(), value.numel() * value.element_size())
        return super().execute_async_v3(stream_handle)

    def _compute(self) -> dict[str, torch.Tensor]:
        from kontext_trt.engines.trt_io import TORCH_DTYPES
        from kontext_trt.runtime.ort_stages import TORCH_DTYPES as ORT_DTYPES

        session, feeds = self._engine._session, {}
        for arg in session.get_inputs():
            dtype, shape = TORCH_DTYPES[self._engine._io[arg.name][1].name], self._shapes[arg.name]
            size = torch.Size(shape).numel() * dtype.itemsize
            held = torch.frombuffer((ctypes.c_byte * size).from_address(self._addresses[arg.name]), dtype=dtype)
            feeds[arg.name] = held.reshape(shape).to(ORT_DTYPES[arg.type]).numpy()
        names = [arg.name for arg in session.get_outputs()]
        return {name: torch.from_numpy(value).to(TORCH_DTYPES[self._engine._io[name][1].name]).contiguous()
                for name, value in zip(names, session.run(names, feeds))}


def network_engine(onnx_path: Path, entry: dict, scratch: int = 4096, streamable: int = 0) -> FakeEngine:
    """A FakeEngine with the I/O of a stage's TensorRT-RTX network (names, dtypes, dynamic axes, parsed from its
    ONNX) and the profile its engine manifest entry records."""
    from kontext_trt.engines import trt_api

    api = trt_api.load_api("tensorrt-rtx")
    net = trt_api.parse_onnx(api, onnx_path).network
    tensors = [*map(net.get_input, range(net.num_inputs)), *map(net.get_output, range(net.num_outputs))]
    io = {t.name: (t.is_network_input, t.dtype, tuple(t.shape)) for t in tensors}
    return FakeEngine(api.trt, io, entry["profile"], scratch, streamable)


class FakeWeights:
    """trt.Weights(type, ptr, count): a view of host memory the refit reads when it runs."""

    _binding = "Weights"

    def __init__(self, type: Any, ptr: int = 0, count: int = 0) -> None:
        self.dtype, self._ptr, self.size = type, ptr, count

    @property
    def nbytes(self) -> int:
        return self.size * ITEM_BYTES[self.dtype.name]

    def _read(self) -> bytes:
        return ctypes.string_at(self._ptr, self.nbytes)


class FakeRefitter:
    """Refitter(engine, logger): weights are set by name, refit on a stream, and stay set until unset, as the real
    one keeps them for the next refit (NvInferRuntime.h, IRefitter::refitCudaEngineAsync)."""

    _binding = "Refitter"

    def __init__(self, engine: FakeEngine, logger: Any) -> None:
        self._engine, self._set = engine, {}

    def set_named_weights(self, name: str, weights: FakeWeights) -> bool:
        if name not in self._engine._refittable:
            return False
        self._set[name] = weights
        self._engine._peak_staged = max(self._engine._peak_staged, sum(w.nbytes for w in self._set.values()))
        return True

    def unset_named_weights(self, name: str) -> bool:
        return self._set.pop(name, None) is not None

    def get_missing_weights(self) -> list[str]:
        needed = {other for name in self._set for other in self._engine._combined.get(name, ())}
        return sorted(needed - set(self._set))

    def get_all_weights(self) -> list[str]:
        return sorted(self._engine._refittable)

    def refit_cuda_engine_async(self, stream_handle: int) -> bool:
        if self.get_missing_weights():
            return False
        for name, weights in self._set.items():
            self._engine._weights[name] = weights._read()
        self._engine._refits.append((sorted(self._set), stream_handle))
        return True


class FakeStream:
    """torch.cuda.Stream's ordering surface, for stage calls on a CPU host."""

    cuda_stream = 7

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def fake_tensorrt(version: str) -> types.ModuleType:
    """A stand-in datacenter `tensorrt` module of a version: the builder surface engines/ uses (recording what a build
    asks of it in `_calls`), the runtime enums, Refitter and Weights. TensorRT 11 dropped the precision builder
    flags (FP16, BF16, INT8, FP8: every network is strongly typed) and deprecated STRONGLY_TYPED (always on): the
    11.x fake has none of them, so code that still touches them on 11 fails here."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt11 = int(version.split(".")[0]) >= 11
    trt._calls = []
    flags = ["TF32", "REFIT", "REFIT_INDIVIDUAL", "WEIGHT_STREAMING"] + ([] if trt11 else ["FP16", "BF16", "INT8", "FP8"])
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {} if trt11 else {"STRONGLY_TYPED": 5})
    trt.LayerType = enum.Enum("LayerType", ["ATTENTION_OUTPUT"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                                       ["STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"])
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"])
    trt.EngineStat = enum.Enum("EngineStat", ["TOTAL_WEIGHTS_SIZE", "STRIPPED_WEIGHTS_SIZE"])
    trt.Refitter, trt.Weights = FakeRefitter, FakeWeights

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

        def __init__(self) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class ITimingCache:
        def serialize(self) -> memoryview:
            return memoryview(b"timing cache")

    class IBuilderConfig:
        def __init__(self) -> None:
            self.progress_monitor, self.builder_optimization_level, self._timing_cache = None, 3, None

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            return ITimingCache()

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            trt._calls.append(("timing_cache", ignore_mismatch))
            self._timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._timing_cache

        def set_flag(self, flag: Any) -> None:
            trt._calls.append(("set_flag", flag.name))

        def clear_flag(self, flag: Any) -> None:
            trt._calls.append(("clear_flag", flag.name))

        def add_optimization_profile(self, profile: Any) -> int:
            trt._calls.append(("profile", dict(profile._shapes)))
            return 0

    class IOptimizationProfile:
        def __init__(self) -> None:
            self._shapes = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class INetworkDefinition:
        num_layers = 0

        def mark_weights_refittable(self, name: str) -> bool:
            trt._calls.append(("refittable", name))
            return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            trt._calls.append(("create_network", flags))
            return INetworkDefinition()

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: Any, config: Any) -> memoryview:
            return memoryview(b"plan")

    class OnnxParser:
        def __init__(self, network: Any, logger: Any) -> None:
            self.num_errors = 0

        def parse_from_file(self, model: str) -> bool:
            trt._calls.append(("parse", model))
            return True

    for cls in (ILogger, IProgressMonitor, ITimingCache, IBuilderConfig, IOptimizationProfile, INetworkDefinition,
                Builder, OnnxParser):
        setattr(trt, cls.__name__, cls)
    return trt


def fake_module_classes(trt: types.ModuleType) -> dict[str, type]:
    """The binding classes (and enums) a fake module stands in for, by their TensorRT name."""
    return {name: value for name, value in vars(trt).items() if isinstance(value, type) and not name.startswith("_")}


def host_bytes(tensor: torch.Tensor) -> bytes:
    """A contiguous CPU tensor's bytes (what a FakeRefitter stores for it)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
