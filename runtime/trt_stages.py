"""The TensorRT backend: each stage is an engine plan (TensorRT or TensorRT-RTX, through engines.trt_api), with the same
named I/O as the torch and onnxruntime adapters.

A call takes the execution context of its input shapes (one per shape, shapes set when it is made), binds the torch
CUDA inputs in place (cast where the engine's dtype differs) and freshly allocated outputs in the engine's dtypes,
and runs execute_async_v3 on the one stream all stages share, joined to torch's current stream by stream waits:
nothing in a call waits on the host, so the denoising loop never synchronises (the timestep and guidance the loop
hands over are device tensors; under CUDA graphs, the graph's static buffers). Every execution context takes its
scratch from ONE device allocation (user-managed context memory), grown to the largest engine's need. Memory modes:
all engines resident (default); low_vram, one engine resident at a time (loaded when its stage is called, freed when
another stage is: the transformer stays for the whole loop); and weight streaming of the transformer within a byte
budget. Loading, freeing, growing the scratch and dropping a context synchronise; calls don't.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from kontext_trt.engines import cache, device as gpus, profiles, trt_api
from kontext_trt.engines.skus import PRECISION_FALLBACK, Sku, precision_refusal
from kontext_trt.runtime import image as im
from kontext_trt.runtime.cudagraphs import GRAPHED_STAGES
from kontext_trt.runtime.errors import KontextError
from kontext_trt.runtime.flow import EditRequest, Kontext, KontextConfig
from kontext_trt.runtime.lru import LruCache
from kontext_trt.runtime.stages import STAGE_IO, STAGE_NAMES

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
OOM_MARKERS = ("outofmemory", "cudaerrormemoryallocation", "memoryallocationfailed", "insufficientmemory",
               "failedtoallocate", "couldnotbeallocated")  # matched against the message lower-cased, without spaces
MAX_CONTEXTS = 8  # execution contexts per engine, one per input shape: a captured graph relies on its context's state
AUTO_HEADROOM = 2**30  # --weight-streaming-budget auto leaves this much device memory to activations and torch


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


def check_io(stage: str, specs: dict[str, TensorSpec], where: str | Path) -> None:
    """Refuse an engine whose I/O is not the stage contract (guidance may be absent: no guidance embedding)."""
    ins, outs = STAGE_IO[stage]
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


def is_oom(message: str) -> bool:
    """Whether a library error message means device memory ran out."""
    squeezed = message.lower().replace(" ", "")
    return any(marker in squeezed for marker in OOM_MARKERS)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) device bytes as the driver sees them; (0, 0) off CUDA."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)


class EnginePool:
    """What the stages of one pipeline share: the stream they run on, the one scratch allocation of every execution
    context, the TensorRT-RTX kernel cache, and which engines are resident (low_vram: one at a time)."""

    def __init__(self, api: trt_api.TrtApi, device: torch.device, low_vram: bool = False, streaming: bool = False,
                 runtime_cache: Path | None = None) -> None:
        self.api, self.device, self.low_vram, self.streaming = api, device, low_vram, streaming
        self.runtime_cache, self.kernel_cache = runtime_cache, None  # RTX: one cache object for every context
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.scratch: torch.Tensor | None = None
        self.resident: OrderedDict[str, TrtStage] = OrderedDict()
        self.moves = 0  # times the scratch moved: every captured graph pointing into it is stale
        self.peak_bytes = 0

    @property
    def mode(self) -> str:
        """The memory mode: resident, low-vram, weight-streaming or low-vram+weight-streaming."""
        modes = [m for m, on in (("low-vram", self.low_vram), ("weight-streaming", self.streaming)) if on]
        return "+".join(modes) or "resident"

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the shared scratch allocation."""
        return 0 if self.scratch is None else self.scratch.numel()

    def resident_bytes(self) -> int:
        """Engine device memory resident now (as measured at load) plus the shared scratch."""
        return sum(s.weights_bytes for s in self.resident.values()) + self.scratch_bytes

    def sync(self) -> None:
        """Wait until the device has finished every queued call (before freeing or moving what they use)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def admit(self, stage: TrtStage) -> None:
        """Make a stage's engine resident; in low_vram mode free the others first (and torch's cached blocks)."""
        if stage.name in self.resident:
            self.resident.move_to_end(stage.name)
            return
        if self.low_vram and self.resident:
            for other in list(self.resident.values()):
                other.unload()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        stage.load()
        self.resident[stage.name] = stage
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes())

    def release(self) -> None:
        """Free every resident engine (persisting TensorRT-RTX's JIT kernels), e.g. before loading another set."""
        for stage in list(self.resident.values()):
            stage.unload()

    def fit(self, need: int) -> None:
        """Grow the shared scratch to at least `need` bytes, pointing every resident context at the new allocation.
        The new one is taken while the old one still serves; if both do not fit, the resident engines are unloaded
        (no context may point at freed memory) and it is taken alone (an out-of-memory error from there on)."""
        if self.scratch is not None and need <= self.scratch_bytes:
            return
        self.sync()
        try:
            scratch = self.allocate(need)
        except torch.cuda.OutOfMemoryError:
            self.scratch = None
            self.release()
            torch.cuda.empty_cache()
            scratch = self.allocate(need)
        self.scratch, self.moves = scratch, self.moves + 1
        for stage in self.resident.values():
            stage.point_at_scratch()

    def allocate(self, need: int) -> torch.Tensor:
        """A device byte buffer of at least `need` bytes (torch's allocator: 512-byte aligned)."""
        return torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)

    def advice(self) -> str:
        """Which memory mode to try next after running out of device memory."""
        if self.streaming:
            return "try a smaller --weight-streaming-budget" + ("" if self.low_vram else " or add --low-vram")
        if self.low_vram:
            return ("add --weight-streaming-budget BYTES (transformer engine built with --weight-streaming) to keep "
                    "part of the transformer's weights in host memory")
        return ("try --low-vram (one engine on the GPU at a time) or --weight-streaming-budget BYTES (transformer "
                "engine built with --weight-streaming)")

    def oom(self, what: str) -> KontextError:
        """The one-line out-of-memory error, with free memory and the mode to try."""
        free, total = device_memory(self.device)
        return KontextError(f"out of device memory {what} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free): "
                            f"{self.advice()}")

    @contextmanager
    def oom_guard(self, what: str) -> Iterator[None]:
        """Turn the ways device memory runs out (torch, the library's log) into the one-line error."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise self.oom(what) from None
        except KontextError as exc:
            if is_oom(str(exc)):
                raise self.oom(what) from None
            raise


class TrtStage:
    """Adapter: named torch tensors in, named torch tensors out, over one engine plan.

    Each input shape gets its own execution context (shapes set once, LRU of MAX_CONTEXTS), all on the pool's
    shared scratch: a CUDA graph captured for one shape keeps replaying that context's state while others run.
    """

    def __init__(self, name: str, plan: Path, pool: EnginePool, weight_budget: int | str | None = None,
                 cuda_graphs: bool = False, rebuild: str = "kontext-trt build") -> None:
        self.name, self.plan, self.pool, self.rebuild = name, Path(plan), pool, rebuild
        self.weight_budget, self.cuda_graphs = weight_budget, cuda_graphs
        self.input_names, self.output_names = STAGE_IO[name]
        self.engine: Any = None
        self.contexts = LruCache(MAX_CONTEXTS, on_evict=self.drop_context)
        self.specs: dict[str, TensorSpec] = {}
        self.native_graphs = False  # TensorRT-RTX captures its own graphs (its contexts are not stream capturable)
        self.events = 0  # loads, unloads, dropped contexts: graphs captured before one are stale
        self.loads = self.weights_bytes = self.scratch_need = self.streamable_bytes = self.budget_bytes = 0
        self.new_kernels = False  # a context was made for a new shape: TensorRT-RTX compiles kernels at its first run

    @property
    def graph_epoch(self) -> tuple[int, int]:
        """Changes whenever an engine, a context or the scratch memory a captured graph points at changes."""
        return self.events, self.pool.moves

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.pool.admit(self)
        with self.pool.oom_guard(f"running the {self.name} engine"):
            ctx, _, outputs = self.prepare(inputs)
            self.enqueue(ctx)
        if self.new_kernels:
            self.save_kernels()
            self.new_kernels = False
        return {name: outputs[name] for name in self.output_names}

    def prepare(self, inputs: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The context for these input shapes with the inputs' and fresh outputs' addresses set: (context, inputs,
        outputs)."""
        feeds = plan_inputs(self.name, self.specs, inputs, self.pool.device, self.rebuild)
        ctx = self.context_for(tuple((name, tuple(t.shape)) for name, t in feeds.items()))
        for name, tensor in feeds.items():
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name, spec in self.specs.items():
            if not spec.is_input:
                outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=spec.dtype,
                                            device=self.pool.device)
                ctx.set_tensor_address(name, outputs[name].data_ptr())
        return ctx, feeds, outputs

    def context_for(self, shapes: tuple) -> Any:
        """The execution context of these input shapes: made with the shapes set on first use; the least recently
        used one is dropped beyond MAX_CONTEXTS."""
        return self.contexts.get_or_make(shapes, lambda: self.shaped_context(shapes)).context

    def shaped_context(self, shapes: tuple) -> trt_api.Context:
        """A new context for these shapes; under CUDA graphs on TensorRT-RTX, one capturing its own graphs if a plain
        one is not stream capturable."""
        ctx = self.new_context(shapes, self.native_graphs)
        if self.cuda_graphs and self.pool.api.is_rtx and not self.native_graphs \
                and not ctx.context.is_stream_capturable(self.stream_handle()):
            ctx, self.native_graphs = self.new_context(shapes, native_graphs=True), True
        self.new_kernels = True
        return ctx

    def drop_context(self, shapes: tuple, ctx: trt_api.Context) -> None:
        """Let an evicted context go once the device is done with it (it may still have work queued)."""
        self.pool.sync()
        self.events += 1

    def enqueue(self, ctx: Any) -> None:
        """execute_async_v3 on the pool's stream, ordered after and before torch's current stream (no host wait)."""
        stream, current = self.pool.stream, torch.cuda.current_stream(self.pool.device)
        stream.wait_stream(current)
        try:
            ran = ctx.execute_async_v3(stream.cuda_stream)
        finally:
            current.wait_stream(stream)  # joined even on failure: a graph capture in progress must end joined
        if not ran:
            raise KontextError(f"the {self.name} engine failed to run: {trt_api.take_errors(self.pool.api)}")

    def load(self) -> None:
        """Deserialize the plan, apply the weight-streaming budget, size the shared scratch (contexts: per shape)."""
        api, free, scratch = self.pool.api, device_memory(self.pool.device)[0], self.pool.scratch_bytes
        with self.pool.oom_guard(f"loading the {self.name} engine {self.plan}"):
            engine = trt_api.load_engine(api, self.plan)
            self.stream_weights(engine)
            specs = engine_io(engine)
            check_io(self.name, specs, self.plan)
            self.scratch_need = int(engine.device_memory_size_v2)  # after the budget: streaming scratch included
            self.pool.fit(self.scratch_need)
            self.engine, self.specs = engine, specs
        grown = self.pool.scratch_bytes - scratch
        self.weights_bytes = max(0, free - device_memory(self.pool.device)[0] - grown)
        self.loads += 1
        self.events += 1

    def new_context(self, shapes: tuple, native_graphs: bool) -> trt_api.Context:
        """An execution context for these input shapes on the shared scratch (TensorRT-RTX: and kernel cache)."""
        pool = self.pool
        ctx = trt_api.create_context(pool.api, self.engine, pool.runtime_cache, user_managed=True, eager_kernels=True,
                                     native_graphs=native_graphs, cache=pool.kernel_cache)
        if ctx.context is None:
            raise KontextError(f"{self.plan}: no execution context: {trt_api.take_errors(pool.api)}")
        pool.kernel_cache = pool.kernel_cache or ctx.cache
        ctx.context.set_device_memory(pool.scratch.data_ptr(), pool.scratch_bytes)
        for name, shape in shapes:
            if not ctx.context.set_input_shape(name, shape):
                raise KontextError(f"{self.name}: the engine refused {name} {list(shape)}: "
                                   f"{trt_api.take_errors(pool.api)}")
        return ctx

    def point_at_scratch(self) -> None:
        """Re-point every context at the pool's (moved) scratch allocation."""
        for ctx in self.contexts.values():
            ctx.context.set_device_memory(self.pool.scratch.data_ptr(), self.pool.scratch_bytes)

    def stream_weights(self, engine: Any) -> None:
        """Set the transformer's weight-streaming budget: bytes of its streamable weights kept on the device, at most
        all of them; 'auto': what fits in the device memory free now, less the engine's scratch and AUTO_HEADROOM
        (computed here: TensorRT's get_weight_streaming_automatic_budget returns an int32 in its Python binding, which
        wraps above 2 GiB)."""
        if self.weight_budget is None:
            return
        self.streamable_bytes = int(engine.streamable_weights_size)
        if self.streamable_bytes <= 0:
            raise KontextError(f"--weight-streaming-budget needs a {self.name} engine built with --weight-streaming; "
                               f"rebuild: {self.rebuild}" + ("" if "--weight-streaming" in self.rebuild
                                                              else " --weight-streaming"))
        if self.weight_budget == "auto":
            free, grow = device_memory(self.pool.device)[0], int(engine.device_memory_size_v2) - self.pool.scratch_bytes
            budget = free - max(0, grow) - AUTO_HEADROOM
        else:
            budget = int(self.weight_budget)
        budget = max(0, min(budget, self.streamable_bytes))
        engine.weight_streaming_budget_v2 = budget  # the binding drops the setter's verdict: read it back
        if int(engine.weight_streaming_budget_v2) != budget:
            raise KontextError(f"{self.plan}: the engine refused a weight-streaming budget of {budget} bytes: "
                               f"{trt_api.take_errors(self.pool.api)}")
        self.budget_bytes = budget

    def unload(self) -> None:
        """Free the engine and its context once the device is done with them."""
        self.pool.sync()
        self.save_kernels()
        self.pool.resident.pop(self.name, None)
        self.contexts.clear()  # every context before its engine
        self.engine = None
        self.events += 1

    def save_kernels(self) -> None:
        """Persist TensorRT-RTX's JIT kernels to the engine folder's runtime cache (TensorRT: nothing to do)."""
        if self.contexts and self.pool.runtime_cache is not None:
            trt_api.save_runtime_cache(next(iter(self.contexts.values())), self.pool.runtime_cache)

    def stream_handle(self) -> int:
        """The raw CUDA stream the engine runs on."""
        return self.pool.stream.cuda_stream

    def graph_refusal(self) -> str | None:
        """Why runtime.cudagraphs must not capture this stage now, or None if it may."""
        if self.native_graphs:
            return "TensorRT-RTX captures this engine's graphs itself (its contexts are not stream capturable)"
        capturable = getattr(next(reversed(self.contexts.values())).context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.stream_handle()):
            return "the execution context is not stream capturable"
        return None

    def memory_stats(self) -> dict[str, int]:
        """Bytes: the plan, this engine's device memory (measured at load), its scratch need, the shared scratch, the
        pool's resident and peak figures, and the weight-streaming budget when streaming."""
        stats = {"engine_bytes": self.plan.stat().st_size, "resident": int(self.name in self.pool.resident),
                 "loads": self.loads, "contexts": len(self.contexts), "weights_device_bytes": self.weights_bytes,
                 "scratch_need_bytes": self.scratch_need, "shared_scratch_bytes": self.pool.scratch_bytes,
                 "pool_resident_bytes": self.pool.resident_bytes(), "pool_peak_bytes": self.pool.peak_bytes}
        if self.weight_budget is not None:
            stats["streamable_weights_bytes"] = self.streamable_bytes
            stats["weight_streaming_budget_bytes"] = self.budget_bytes
        return stats


def memory_summary(stages: dict) -> str:
    """One line: the memory mode's device memory, engines + shared scratch resident now and at peak, torch's peak."""
    pool = next(s.pool for s in stages.values() if isinstance(s, TrtStage))
    torch_peak = torch.cuda.max_memory_allocated(pool.device) if pool.device.type == "cuda" else 0
    return (f"device memory ({pool.mode}): engines + scratch {pool.resident_bytes() / 2**30:.2f} GiB "
            f"resident, {pool.peak_bytes / 2**30:.2f} GiB peak; torch tensors {torch_peak / 2**30:.2f} GiB peak "
            f"(scratch {pool.scratch_bytes / 2**30:.2f} GiB of it)")


@dataclass(frozen=True)
class Geometry:
    """What a request needs of the engines: output size, batch and the context image size (None: text-to-image)."""

    width: int
    height: int
    batch: int = 1
    context: tuple[int, int] | None = None


def request_geometry(req: EditRequest) -> Geometry:
    """The geometry of an EditRequest: the sizes flow.edit will use."""
    context = im.context_size(*req.image.size, auto_resize=req.auto_resize) if req.image is not None else None
    width, height = (req.width, req.height) if req.width is not None else context or (1024, 1024)
    return Geometry(width, height, len(req.prompts), context)


def cuda_gpu() -> gpus.Gpu:
    """The GPU the engines must run on, or one line saying there is none."""
    gpu, why = gpus.detect_gpu()  # torch's current CUDA device, found in NVML by its UUID
    if gpu is not None and gpu.cuda_index is None:
        gpu, why = None, f"torch {torch.__version__} sees no CUDA device (a CPU-only torch build?)"
    if gpu is None:
        raise KontextError(f"--engines runs TensorRT engines on an NVIDIA GPU and none is usable here ({why}): run on "
                           "the GPU the engines were built for, or use --backend onnxruntime --onnx DIR")
    return gpu


def pick_api(root: Path, sku: Sku) -> trt_api.TrtApi:
    """The installed TensorRT flavour that root has engines of for this SKU (the SKU's own flavour first)."""
    installed = []
    for flavor in dict.fromkeys([sku.flavor, *trt_api.MODULES]):
        try:
            installed.append(trt_api.load_api(flavor))
        except KontextError:
            continue
    if not installed:
        trt_api.load_api(sku.flavor)  # raises the one-line install hint
    return next((api for api in installed if (Path(root) / sku.tag / api.folder).is_dir()), installed[0])


def default_geometry(folder: Path) -> Geometry:
    """The geometry an engine set covers if it covers anything: its opt size, batch at its low end, an edit when it
    has a VAE encoder."""
    manifest = cache.read_manifest(folder) or {}
    build = manifest.get("build", {})
    width, height = profiles.opt_size(profiles.parse_sizes(build.get("static") or build.get("sizes") or "1024x1024"))
    edit = "vae_encoder" in manifest.get("stages", {"vae_encoder": None})
    return Geometry(width, height, profiles.parse_batch(build.get("batch", "1"))[0], (width, height) if edit else None)


def text_side(manifest: dict, onnx: Path | None, model: Path | None) -> tuple[Any, Any, KontextConfig]:
    """(CLIP tokenizer, T5 tokenizer, KontextConfig): from the export folder the engines were built from (or --onnx),
    else from the checkpoint (--model)."""
    from kontext_trt.export.manifest import read_manifest
    from kontext_trt.runtime.checkpoint import load_tokenizer_folders

    folder = onnx or manifest.get("onnx", {}).get("dir")
    export = read_manifest(Path(folder)) if folder and Path(folder).is_dir() else None
    if export is not None:
        clip, t5 = load_tokenizer_folders(Path(folder) / export["tokenizers"]["clip"],
                                          Path(folder) / export["tokenizers"]["t5"])
        return clip, t5, KontextConfig.from_dict(manifest.get("onnx", {}).get("kontext") or export["kontext"])
    if model is None:
        raise KontextError(f"the export folder the engines were built from ({folder}) holds no manifest.json, and "
                           "the tokenizers and loop config come from it: pass --onnx EXPORT_DIR or --model CHECKPOINT")
    from kontext_trt.runtime import checkpoint as ck

    ckpt = ck.open_checkpoint(model)
    return (*ck.load_tokenizers(ckpt), KontextConfig.from_checkpoint(ckpt))


def gpu_sku(name: str, gpu: gpus.Gpu) -> Sku:
    """The SKU whose engines run on this GPU: NVML's ('auto'), or one named, which must be this GPU's architecture
    (an engine runs only on the compute capability it was built for)."""
    sku = gpus.resolve_sku(name, gpu)
    if sku.sm != gpu.sm:
        raise KontextError(f"--sku {name} engines are for sm{sku.sm} and this GPU ({gpu.name}) is sm{gpu.sm}: use "
                           f"--sku auto, or build engines for it with kontext-trt build --sku auto")
    return sku


def load_trt_kontext(engines: Path, precision: str | None = None, sku: str = "auto", geometry: Geometry | None = None,
                     onnx: Path | None = None, model: Path | None = None, low_vram: bool = False,
                     weight_budget: int | str | None = None, cuda_graphs: bool = False) -> Kontext:
    """A Kontext pipeline over the engine set in `engines` for this GPU (or the SKU named), the installed TensorRT and
    `precision` (default: the only one built) that covers `geometry` (default: the set's own opt size), or one line
    saying why not and the build command that makes it."""
    gpu = cuda_gpu()
    sku = gpu_sku(sku, gpu)
    api = pick_api(engines, sku)
    precision = cache.pick_precision(Path(engines) / sku.tag / api.folder, precision)
    refusal = precision_refusal(precision, gpu.sm)
    if refusal is not None:
        fallback = PRECISION_FALLBACK.get(precision, "fp32")
        raise KontextError(f"{gpu.name} cannot run {precision} engines: {refusal}: run {fallback} engines instead "
                           f"(--precision {fallback.split()[0]})")
    folder = cache.engine_folder(engines, sku, api.folder, precision)
    g = geometry or default_geometry(folder)
    found = cache.find_engines(engines, sku, api.folder, precision, g.width, g.height, g.batch, g.context)
    clip_tok, t5_tok, config = text_side(found.manifest, onnx, model)
    device = torch.device("cuda", gpu.cuda_index)  # the device whose SKU was detected
    pool = EnginePool(api, device, low_vram, weight_budget is not None, found.runtime_cache)
    rebuild = found.manifest.get("command", "kontext-trt build")
    stages = {name: TrtStage(name, found.plans[name], pool, weight_budget if name == "transformer" else None,
                             cuda_graphs and name in GRAPHED_STAGES, rebuild)
              for name in STAGE_NAMES if name in found.plans}
    if not low_vram:  # the transformer last: an auto weight-streaming budget sees what the other engines took
        for name in sorted(stages, key=lambda name: name == "transformer"):
            pool.admit(stages[name])
    info = {"backend": api.flavor, "dtype": precision, "precision": precision, "engines": str(found.folder),
            "checkpoint": (found.manifest.get("checkpoint_fingerprint") or "")[:16] or None, "memory_mode": pool.mode}
    return Kontext(stages, clip_tok, t5_tok, config, device, info=info)
