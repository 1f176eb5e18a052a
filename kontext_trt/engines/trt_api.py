"""The one adapter between TensorRT and TensorRT-RTX: module, version, targets, caches, header and memory checks.

TensorRT builds on the GPU it targets and tunes kernels with a timing cache. TensorRT-RTX builds ahead of time on any
host for the compute capabilities named in IBuilderConfig (docs: inference-library/cpu-engines.html), compiles kernels
just in time on the user's GPU and keeps them in a runtime cache (work-with-runtime-cache.html); its timing cache has
no effect and forces a GPU query (timing-cache-migration.html); IRuntime.get_engine_validity checks a plan header
against the running GPU (engine-compatibility.html).

TensorRT 10 and 11 differ for this project in one place, build_rules: 11 builds strongly typed networks only (no
STRONGLY_TYPED creation flag to pass, no precision builder flags); 10 needs the flag. TensorRT 10.14 is the floor: its
ONNX parser is the first to take the Attention op (opset 23) the exports use.
"""
from __future__ import annotations

import functools
import importlib
import mmap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import write_atomic

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
EXTRAS = {"tensorrt": "trt", "tensorrt-rtx": "rtx"}
# TensorRT-RTX 1.x plan header (observed with 1.7, undocumented): b"vtrt" at 0 and 28, version bytes (major, minor,
# patch, build) at 24, a bit mask of the target compute capabilities at 32. Used only as a cross-check.
RTX_MAGIC = b"vtrt"
RTX_CC_BITS = {75: 0x01, 80: 0x02, 86: 0x04, 89: 0x08, 120: 0x10, 121: 0x20}
# Oldest usable versions: TensorRT 10.14 parses ONNX Attention (opset 23); TensorRT-RTX 1.2 brought
# REQUIRE_USER_ALLOCATION, is_stream_capturable and its own CUDA graphs. pyproject.toml's extras say the same.
MIN_VERSIONS = {"tensorrt": (10, 14), "tensorrt-rtx": (1, 2)}


@dataclass(frozen=True)
class TrtApi:
    """One TensorRT flavour: the imported module and its name."""

    flavor: str  # "tensorrt" or "tensorrt-rtx"
    trt: ModuleType

    @property
    def version(self) -> str:
        """The library version, e.g. 10.13.0.35 or 1.7.1.116."""
        return self.trt.__version__

    @property
    def folder(self) -> str:
        """The engine-cache folder of this flavour and version: <flavor>-<version>."""
        return f"{self.flavor}-{self.version}"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The version as integers, e.g. (10, 14, 1, 48)."""
        return tuple(int(part) for part in self.version.split(".") if part.isdigit())

    @property
    def is_rtx(self) -> bool:
        """True for TensorRT-RTX: builds on any host for named compute capabilities, JIT-compiles on the GPU."""
        return self.flavor == "tensorrt-rtx"

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT 11 on: every network is strongly typed and the weak-typing (precision) builder flags are gone."""
        return not self.is_rtx and self.version_tuple[:1] >= (11,)


@functools.cache
def load_api(flavor: str) -> TrtApi:
    """Import the module of a flavour, or fail with one line saying how to install it."""
    if flavor not in MODULES:
        raise KontextError(f"unknown backend {flavor}: use one of {', '.join(MODULES)}", "backend", "invalid_value")
    try:
        api = TrtApi(flavor, importlib.import_module(MODULES[flavor]))
    except (ImportError, OSError) as exc:
        raise KontextError(f"{flavor} is not usable here ({exc.__class__.__name__}: {exc}): install it with "
                           f"pip install 'kontext-trt[{EXTRAS[flavor]}]'"
                           + (" on a host with an NVIDIA driver" if flavor == "tensorrt" else ""),
                           "backend", "not_installed") from None
    floor = MIN_VERSIONS[flavor]
    if api.version_tuple[:2] < floor:
        raise KontextError(f"{flavor} {api.version} is older than {'.'.join(map(str, floor))}, the oldest that parses "
                           "the exports' ONNX Attention op and runs this project's engines: upgrade it with "
                           f"pip install 'kontext-trt[{EXTRAS[flavor]}]'", "backend", "unsupported_version")
    return api


@functools.cache
def _logger(api: TrtApi) -> Any:
    """One logger per flavour that keeps errors for exception messages and drops the rest (it must outlive every
    TensorRT object made with it)."""
    trt = api.trt

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.messages.append(msg.strip())

        def _take(self) -> str:
            text, self.messages = " | ".join(self.messages), []
            return text or "no error message from the library"

    return Logger()


@functools.cache
def _runtime(api: TrtApi) -> Any:
    """The process-wide runtime of a flavour (it must outlive every engine it deserializes)."""
    return api.trt.Runtime(_logger(api))


@dataclass
class Network:
    """A parsed, strongly typed network with the objects that must outlive the build."""

    builder: Any
    network: Any
    parser: Any


@dataclass(frozen=True)
class BuildRules:
    """How this library wants a strongly typed network and its builder config set up."""

    network_flags: int  # create_network flags: STRONGLY_TYPED (TensorRT 10, TensorRT-RTX), none on TensorRT 11
    cleared_flags: tuple  # builder flags to clear: TF32 where the library has it, so fp32 layers stay fp32
    set_flags: tuple  # builder flags to set: REQUIRE_USER_ALLOCATION on TensorRT-RTX (for stream capture)


def build_rules(api: TrtApi, weight_streaming: bool = False) -> BuildRules:
    """The one place TensorRT 10, TensorRT 11 and TensorRT-RTX differ in how a network is built: 11 is strongly typed
    only (the creation flag is not passed; there are no precision builder flags); TensorRT-RTX contexts take
    user-allocated memory so the runtime can capture them in its own CUDA graphs (RTX refuses that together with weight
    streaming, which allocates at run time). Precision always comes from the ONNX."""
    trt = api.trt
    network_flags = 0 if api.strongly_typed_only else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    cleared = tuple(f for f in (getattr(trt.BuilderFlag, "TF32", None),) if f is not None)
    required = (trt.BuilderFlag.REQUIRE_USER_ALLOCATION,) if api.is_rtx and not weight_streaming else ()
    return BuildRules(network_flags, cleared, required)


def parse_onnx(api: TrtApi, onnx_path: Path) -> Network:
    """Parse an ONNX file (external data next to it) into a strongly typed network: precision comes from the ONNX."""
    trt, log = api.trt, _logger(api)
    log._take()
    builder = trt.Builder(log)
    network = builder.create_network(build_rules(api).network_flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise KontextError(f"{api.flavor} cannot parse {onnx_path}: {errors or log._take()}", "onnx", "invalid_value")
    return Network(builder, network, parser)


def decompose_attention(api: TrtApi, network: Any) -> None:
    """Let every attention op (ONNX Attention, opset 23) decompose into plain kernels where no fused kernel fits:
    TensorRT-RTX 1.7 has no fused fp32 attention kernel, nor one for small heads (head size 8 in bf16), and fails the
    build otherwise. A fused kernel is still taken wherever one exists."""
    kind = getattr(api.trt.LayerType, "ATTENTION_OUTPUT", None)  # libraries without IAttention parse no Attention op
    for index in range(network.num_layers if kind is not None else 0):
        layer = network.get_layer(index)
        if layer.type == kind:
            layer.__class__ = api.trt.IAttentionOutputLayer  # get_layer returns the ILayer base
            layer.attention.decomposable = True


def runtime_flags(api: TrtApi, config: Any, weight_streaming: bool) -> None:
    """Apply build_rules' builder flags to a builder config."""
    rules = build_rules(api, weight_streaming)
    for flag in rules.cleared_flags:
        config.clear_flag(flag)
    for flag in rules.set_flags:
        config.set_flag(flag)


def progress_monitor(api: TrtApi) -> Any:
    """A TensorRT IProgressMonitor that shows each build phase as a tqdm bar (keep it alive until the build ends)."""
    from tqdm import tqdm

    from kontext_trt.core.timing import is_quiet

    class Monitor(api.trt.IProgressMonitor):
        def __init__(self) -> None:
            api.trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}
            self.phases = 0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = len(self.bars)
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0,
                                         unit="step", dynamic_ncols=True, disable=True if is_quiet() else None)
            self.phases += 1

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def check_targets(api: TrtApi, sms: tuple[int, ...], device_sm: int | None) -> list:
    """Refuse targets this flavour cannot build for; the ComputeCapability values to set (TensorRT: none)."""
    if api.is_rtx:
        names = [getattr(api.trt.ComputeCapability, f"SM{sm}", None) for sm in sms]
        if None in names:
            known = ", ".join(n.lower() for n in api.trt.ComputeCapability.__members__ if n.startswith("SM"))
            raise KontextError(f"{api.folder} cannot target sm{sms[names.index(None)]}: it builds for {known}; "
                               f"use --backend tensorrt for datacenter GPUs", "target", "gpu_mismatch")
        return names
    if device_sm is None:
        raise KontextError("TensorRT builds an engine on the GPU it will run on and no GPU is present: run the build "
                           "on that GPU, or use --backend tensorrt-rtx to build RTX engines on this host",
                           "target", "gpu_unavailable")
    if tuple(sms) != (device_sm,):
        raise KontextError(f"TensorRT builds only for the GPU present (sm{device_sm}), not for "
                           f"{','.join(f'sm{s}' for s in sms)}: run the build on that GPU or drop --target",
                           "target", "gpu_mismatch")
    return []


def set_targets(api: TrtApi, config: Any, sms: tuple[int, ...], device_sm: int | None) -> None:
    """Make the engine run on these compute capabilities (RTX: named in the config; TensorRT: the GPU present)."""
    names = check_targets(api, sms, device_sm)
    if names:
        config.num_compute_capabilities = len(names)
        for index, name in enumerate(names):
            config.set_compute_capability(name, index)


@contextmanager
def timing_cache(api: TrtApi, config: Any, path: Path | None) -> Iterator[None]:
    """TensorRT: load the timing cache at path into config, and save it back after the build. TensorRT-RTX: nothing."""
    if api.is_rtx or path is None:
        yield
        return
    blob = path.read_bytes() if path.exists() else b""
    config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    yield
    cache = config.get_timing_cache()
    if cache is not None:
        write_atomic(path, memoryview(cache.serialize()))


def build_serialized(api: TrtApi, net: Network, config: Any, what: str) -> memoryview:
    """Build the plan, or fail with one line carrying the library's errors."""
    plan = net.builder.build_serialized_network(net.network, config)
    if plan is None or plan.nbytes == 0:
        raise KontextError(f"{api.folder} failed to build {what}: {_logger(api)._take()}")
    return memoryview(plan)


def rtx_header(plan: bytes | memoryview) -> tuple[str, tuple[int, ...]] | None:
    """(version, target compute capabilities) read from a TensorRT-RTX plan header, or None if it is not one."""
    head = bytes(plan[:40])
    if len(head) < 40 or head[:4] != RTX_MAGIC or head[28:32] != RTX_MAGIC:
        return None
    mask = int.from_bytes(head[32:40], "little")
    return ".".join(str(b) for b in head[24:28]), tuple(sm for sm, bit in RTX_CC_BITS.items() if mask & bit)


def header_validity(api: TrtApi, plan: bytes | memoryview, gpu: bool) -> str:
    """TensorRT-RTX's header check of a plan against this host, without loading it: valid, suboptimal,
    invalid: REASONS, malformed, or unchecked: WHY (TensorRT has no such check)."""
    if not api.is_rtx:
        return "unchecked: TensorRT checks a plan only by deserializing it"
    runtime = _runtime(api)
    validity, diagnostics = runtime.get_engine_validity(plan[:runtime.engine_header_size])
    _logger(api)._take()  # without a GPU the call logs a CUDA error; the verdict below says it plainly
    flags = [n for n, f in api.trt.EngineInvalidityDiagnostics.__members__.items() if diagnostics & int(f)]
    if "MALFORMED_ENGINE" in flags:
        return "malformed"
    if not gpu:
        return "unchecked: the header is well formed; compute capability and driver checks need a GPU"
    return validity.name.lower() + (f": {', '.join(flags)}" if flags else "")


def inspect_plan(api: TrtApi, plan: bytes | memoryview, gpu: bool) -> dict:
    """What this host can tell about a new plan: header validity, header fields (RTX), device memory or why unknown."""
    header = rtx_header(plan) if api.is_rtx else None
    info = {"validity": header_validity(api, plan, gpu), "device_memory_bytes": None, "device_memory_note": None,
            "header": header and {"version": header[0], "targets": [f"sm{sm}" for sm in header[1]]}}
    if not gpu:
        info["device_memory_note"] = (f"{api.flavor} reports device memory only for a deserialized engine, which "
                                      "needs a GPU; this plan was built ahead of time on a host without one")
        return info
    engine = _runtime(api).deserialize_cuda_engine(plan)
    if engine is None:
        info["validity"], info["device_memory_note"] = f"invalid: {_logger(api)._take()}", "the plan does not load here"
    else:
        info["validity"] = info["validity"] if api.is_rtx else "valid"
        info["device_memory_bytes"] = int(engine.device_memory_size_v2)
    return info


def load_engine(api: TrtApi, plan_path: Path) -> Any:
    """Deserialize a plan file (memory-mapped: no second copy of a large plan) into an ICudaEngine, or fail."""
    with open(plan_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
        engine = _runtime(api).deserialize_cuda_engine(plan)
    if engine is None:
        raise KontextError(f"{plan_path} does not load with {api.folder}: {_logger(api)._take()}; rebuild it with "
                           f"kontext-trt build", "engines", "gpu_mismatch")
    return engine


@dataclass
class ExecContext:
    """An execution context with the TensorRT-RTX runtime config and cache it uses (they must outlive it)."""

    exec_ctx: Any
    config: Any = None
    cache: Any = None


def create_context(api: TrtApi, engine: Any, runtime_cache: Path | None = None, user_managed: bool = False,
                   eager_kernels: bool = False, native_graphs: bool = False, cache: Any = None) -> ExecContext:
    """An execution context; user_managed: scratch memory comes from context.set_device_memory. TensorRT-RTX only:
    the JIT kernel cache (`cache`, an object shared between contexts, else loaded from runtime_cache), shape-specialized
    kernels compiled at first use (eager_kernels) and the library's own CUDA graphs (native_graphs)."""
    strategy = (api.trt.ExecutionContextAllocationStrategy.USER_MANAGED if user_managed
                else api.trt.ExecutionContextAllocationStrategy.STATIC)
    if not api.is_rtx:
        return ExecContext(engine.create_execution_context(strategy))
    config = engine.create_runtime_config()
    config.set_execution_context_allocation_strategy(strategy)
    if eager_kernels:
        config.dynamic_shapes_kernel_specialization_strategy = api.trt.DynamicShapesKernelSpecializationStrategy.EAGER
    if native_graphs:
        config.cuda_graph_strategy = api.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    if cache is None and runtime_cache is not None:
        cache = config.create_runtime_cache()
        if Path(runtime_cache).exists():
            cache.deserialize(Path(runtime_cache).read_bytes())
    if cache is not None:
        config.set_runtime_cache(cache)
    return ExecContext(engine.create_execution_context(config), config, cache)


def take_errors(api: TrtApi) -> str:
    """The errors the library logged since the last call (for one-line messages)."""
    return _logger(api)._take()


def save_runtime_cache(made: ExecContext, runtime_cache: Path) -> None:
    """Persist the kernels TensorRT-RTX compiled for this context (TensorRT has no runtime cache: nothing to do)."""
    if made.cache is not None:
        write_atomic(Path(runtime_cache), memoryview(made.cache.serialize()))


def polygraphy_runner(api: TrtApi, plan_path: Path, name: str = "engine") -> Any:
    """A polygraphy TrtRunner for a plan file, with polygraphy switched to this flavour's module."""
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = api.is_rtx  # read when polygraphy.backend.trt is first imported
    from polygraphy.backend.trt import TrtRunner

    return TrtRunner(load_engine(api, plan_path), name=name)
