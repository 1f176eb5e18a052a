"""The TensorRT backend: each stage is an engine plan (TensorRT or TensorRT-RTX, through engines.trt_api), with the same
named I/O as the torch and onnxruntime adapters.

A call takes the execution context of its input shapes (one per shape, shapes set when it is made), binds the torch
CUDA inputs in place (cast to each binding's dtype: runtime.trt_io) and freshly allocated outputs in the engine's
dtypes, and runs execute_async_v3 on the one stream all stages share, joined to torch's current stream by stream
waits: nothing in a call waits on the host, so the denoising loop never synchronises. Every execution context takes
its scratch from ONE device allocation (runtime.trt_pool), grown to the largest engine's need; a TensorRT-RTX engine
built for weight streaming allocates its own. Memory modes: all engines resident (default); low_vram, one engine
resident at a time; and weight streaming of the transformer within a byte budget. Under CUDA graphs a TensorRT-RTX
context that is not stream capturable after its first run hands capture to TensorRT-RTX (its own graphs): such
contexts own fixed I/O buffers, bound once, and calls copy in and out; an engine that streams weights is never
captured (graph_refusal). Loading, freeing, growing the scratch and dropping a context
synchronise; calls don't.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.lru import LruCache
from kontext_trt.core.stages import STAGE_IO
from kontext_trt.engines import trt_api
from kontext_trt.engines.trt_io import StageIO, TensorSpec, check_io, engine_io, plan_inputs
from kontext_trt.engines.trt_pool import EnginePool, device_memory

if TYPE_CHECKING:
    from kontext_trt.engines.trt_refit import RefitWeights

MAX_CONTEXTS = 8  # execution contexts per engine, one per input shape: a captured graph relies on its exec_ctx's state
AUTO_HEADROOM = 2**30  # --weight-streaming-budget auto leaves this much device memory to activations and torch
AUTO_ROUNDS = 4  # auto budget: set, re-read the scratch it implies, lower; at most this many times


@dataclass
class ShapeContext:
    """The execution context of one set of input shapes. Under TensorRT-RTX's own CUDA graphs it owns fixed I/O
    buffers, bound once (RTX re-captures its graph whenever a bound address changes): calls copy in and out."""

    made: trt_api.ExecContext  # the execution context with the RTX runtime config and kernel cache it uses
    buffers: dict[str, torch.Tensor] | None = None
    runs: int = 0

    @property
    def exec_ctx(self) -> Any:
        """The TensorRT execution context."""
        return self.made.exec_ctx


def takes_user_memory(api: trt_api.TrtApi, engine: Any) -> bool:
    """Whether the engine's execution contexts take scratch memory from the runtime (set_device_memory): always on
    TensorRT; on TensorRT-RTX unless the engine streams weights (built without REQUIRE_USER_ALLOCATION: it allocates
    its own at run time, and its contexts are then not stream capturable)."""
    return not (api.is_rtx and int(engine.streamable_weights_size) > 0)


class TrtStage:
    """Adapter: named torch tensors in, named torch tensors out, over one engine plan.

    Each input shape gets its own execution context (shapes set once, LRU of MAX_CONTEXTS), all on the pool's
    shared scratch: a CUDA graph captured for one shape keeps replaying that exec_ctx's state while others run.
    """

    def __init__(self, name: str, plan: Path, pool: EnginePool, weight_budget: int | str | None = None,
                 cuda_graphs: bool = False, rebuild: str = "kontext-trt build", onnx_dir: Path | None = None,
                 io: StageIO | None = None) -> None:
        self.name, self.plan, self.pool, self.rebuild = name, Path(plan), pool, rebuild
        self.onnx_dir = onnx_dir  # --onnx: the export the engine was built from (LoRA swaps read its weights)
        self.weights_target: RefitWeights | None = None  # engines.trt_refit: its LoRA set, set again on each load
        self.weight_budget, self.cuda_graphs = weight_budget, cuda_graphs
        self.input_names, self.output_names = io or STAGE_IO[name]  # the family's (core.family.Family.io)
        self.engine: Any = None
        self.exec_ctxs = LruCache(MAX_CONTEXTS, on_evict=self.drop_context)
        self.specs: dict[str, TensorSpec] = {}
        self.user_memory = True  # contexts on the pool's shared scratch (see takes_user_memory)
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
            shaped, outputs = self.prepare(inputs)
            self.enqueue(shaped.exec_ctx)
        shaped.runs += 1
        if shaped.runs == 1:
            self.after_first_run(shaped)
        if self.new_kernels:
            self.save_kernels()
            self.new_kernels = False
        if shaped.buffers is not None:  # the next call overwrites them
            return {name: outputs[name].clone() for name in self.output_names}
        return {name: outputs[name] for name in self.output_names}

    def prepare(self, inputs: dict[str, torch.Tensor]) -> tuple[ShapeContext, dict[str, torch.Tensor]]:
        """The context for these input shapes, its inputs in place: bound as they are (fresh outputs bound too), or
        copied into its fixed buffers under native graphs; (context, outputs)."""
        feeds = plan_inputs(self.name, self.specs, inputs, self.pool.device, self.rebuild)
        shaped = self.context_for(tuple((name, tuple(t.shape)) for name, t in feeds.items()))
        if shaped.buffers is not None:
            for name, tensor in feeds.items():
                shaped.buffers[name].copy_(tensor)
            return shaped, {name: shaped.buffers[name] for name in self.output_names}
        exec_ctx = shaped.exec_ctx
        for name, tensor in feeds.items():
            exec_ctx.set_tensor_address(name, tensor.data_ptr())
        return shaped, self.bind_outputs(exec_ctx)

    def bind_outputs(self, exec_ctx: Any) -> dict[str, torch.Tensor]:
        """Fresh output tensors in the engine's dtypes and the shapes the context infers, bound to it."""
        outputs = {}
        for name, spec in self.specs.items():
            if not spec.is_input:
                outputs[name] = torch.empty(tuple(exec_ctx.get_tensor_shape(name)), dtype=spec.dtype,
                                            device=self.pool.device)
                exec_ctx.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def context_for(self, shapes: tuple) -> ShapeContext:
        """The execution context of these input shapes: made with the shapes set on first use; the least recently
        used one is dropped beyond MAX_CONTEXTS."""
        return self.exec_ctxs.get_or_make(shapes, lambda: self.shaped_context(shapes))

    def shaped_context(self, shapes: tuple) -> ShapeContext:
        """A new context for these shapes; under native graphs with its fixed I/O buffers bound once."""
        made = self.new_context(shapes, self.native_graphs)
        self.new_kernels = True
        if not self.native_graphs:
            return ShapeContext(made)
        buffers = {name: torch.empty(shape, dtype=self.specs[name].dtype, device=self.pool.device)
                   for name, shape in shapes}
        buffers.update(self.bind_outputs(made.exec_ctx))
        for name, shape in shapes:
            made.exec_ctx.set_tensor_address(name, buffers[name].data_ptr())
        return ShapeContext(made, buffers)

    def after_first_run(self, shaped: ShapeContext) -> None:
        """Under CUDA graphs on TensorRT-RTX, ask whether a plain context is stream capturable once it has run (its
        answer may change with the first enqueue); if not, RTX captures the graphs itself from now on: every context
        is dropped and made again with fixed buffers. An engine that streams weights gets no graphs at all (see
        graph_refusal)."""
        if not (self.cuda_graphs and self.pool.api.is_rtx) or self.native_graphs or self.streams_weights():
            return
        if not shaped.exec_ctx.is_stream_capturable(self.stream_handle()):
            self.native_graphs = True
            self.pool.sync()
            self.exec_ctxs.clear()
            self.events += 1

    def drop_context(self, shapes: tuple, shaped: ShapeContext) -> None:
        """Let an evicted context go once the device is done with it (it may still have work queued)."""
        self.pool.sync()
        self.events += 1

    def enqueue(self, exec_ctx: Any) -> None:
        """execute_async_v3 on the pool's stream, ordered after and before torch's current stream (no host wait)."""
        stream, current = self.pool.stream, torch.cuda.current_stream(self.pool.device)
        stream.wait_stream(current)
        try:
            ran = exec_ctx.execute_async_v3(stream.cuda_stream)
        finally:
            current.wait_stream(stream)  # joined even on failure: a graph capture in progress must end joined
        if not ran:
            raise KontextError(f"the {self.name} engine failed to run: {trt_api.take_errors(self.pool.api)}")

    def load(self) -> None:
        """Deserialize the plan, apply the weight-streaming budget, size the shared scratch (contexts: per shape)."""
        api, free, scratch = self.pool.api, device_memory(self.pool.device)[0], self.pool.scratch_bytes
        with self.pool.oom_guard(f"loading the {self.name} engine {self.plan}"):
            engine = trt_api.load_engine(api, self.plan)
            self.user_memory = takes_user_memory(api, engine)
            self.set_weight_budget(engine)
            specs = engine_io(engine)
            check_io(self.name, specs, self.plan, (self.input_names, self.output_names))
            self.scratch_need = int(engine.device_memory_size_v2)  # after the budget: streaming scratch included
            if self.user_memory:
                self.pool.grow_scratch(self.scratch_need)
            self.engine, self.specs = engine, specs
        grown = self.pool.scratch_bytes - scratch
        self.weights_bytes = self.resident_weights(engine, max(0, free - device_memory(self.pool.device)[0] - grown))
        self.loads += 1
        self.events += 1
        if self.weights_target is not None:  # a fresh engine holds the exported weights: its LoRA set goes back on
            self.weights_target.engine_reloaded()

    def new_context(self, shapes: tuple, native_graphs: bool) -> trt_api.ExecContext:
        """An execution context for these input shapes on the shared scratch (unless the engine allocates its own),
        with the TensorRT-RTX kernel cache."""
        pool = self.pool
        made = trt_api.create_context(pool.api, self.engine, pool.runtime_cache, user_managed=self.user_memory,
                                      eager_kernels=True, native_graphs=native_graphs, cache=pool.kernel_cache)
        if made.exec_ctx is None:
            raise KontextError(f"{self.plan}: no execution context: {trt_api.take_errors(pool.api)}")
        pool.kernel_cache = pool.kernel_cache or made.cache
        if self.user_memory:
            made.exec_ctx.set_device_memory(pool.scratch.data_ptr(), pool.scratch_bytes)
        for name, shape in shapes:
            if not made.exec_ctx.set_input_shape(name, shape):
                raise KontextError(f"{self.name}: the engine refused {name} {list(shape)}: "
                                   f"{trt_api.take_errors(pool.api)}")
        return made

    def follow_scratch(self) -> None:
        """The pool's scratch moved: re-point the plain contexts at it; drop the native-graph ones (RTX's captured
        graph holds the old address: a new context captures afresh)."""
        if not self.user_memory:
            return
        for shapes, shaped in list(self.exec_ctxs.items()):
            if shaped.buffers is not None:
                del self.exec_ctxs[shapes]
                self.events += 1
            else:
                shaped.exec_ctx.set_device_memory(self.pool.scratch.data_ptr(), self.pool.scratch_bytes)

    def set_weight_budget(self, engine: Any) -> None:
        """Set the transformer's weight-streaming budget: bytes of its streamable weights kept on the device, at most
        all of them. 'auto': what fits in the device memory free now beside the engine's scratch and AUTO_HEADROOM;
        the scratch grows with what streams, so the budget is set, the scratch re-read, and the budget lowered until
        both fit (computed here: TensorRT's get_weight_streaming_automatic_budget returns an int32 in its Python
        binding, which wraps above 2 GiB)."""
        if self.weight_budget is None:
            return
        self.streamable_bytes = int(engine.streamable_weights_size)
        if self.streamable_bytes <= 0:
            raise KontextError(self.no_streamable_weights())
        if self.weight_budget != "auto":
            self.budget_bytes = self.apply_budget(engine, max(0, min(int(self.weight_budget), self.streamable_bytes)))
            return
        free, budget = device_memory(self.pool.device)[0], self.streamable_bytes
        for _ in range(AUTO_ROUNDS):
            budget = max(0, min(budget, free - self.scratch_growth(engine) - AUTO_HEADROOM))
            self.apply_budget(engine, budget)
            if budget == 0 or budget + self.scratch_growth(engine) + AUTO_HEADROOM <= free:
                break
        self.budget_bytes = budget

    def resident_weights(self, engine: Any, measured: int) -> int:
        """Device bytes of this engine: as measured across its load, but for a streaming engine its weights less the
        part that streams (EngineStat.TOTAL_WEIGHTS_SIZE, TensorRT 10.14 and TensorRT-RTX): the reading spans budgets
        that held every weight on the device (the default budget disables streaming, and 'auto' starts from all of
        them; NvInferRuntime.h: setWeightStreamingBudgetV2 allocates the weights' memory), which the library's memory
        pool may keep after the budget drops."""
        if not self.streams_weights():
            return measured
        total = int(engine.get_engine_stat(self.pool.api.trt.EngineStat.TOTAL_WEIGHTS_SIZE))
        return max(0, total - (self.streamable_bytes - self.budget_bytes))

    def scratch_growth(self, engine: Any) -> int:
        """Device bytes the engine's scratch takes beyond what the pool holds already (all of it when the engine
        allocates its own)."""
        need = int(engine.device_memory_size_v2)
        return max(0, need - self.pool.scratch_bytes) if self.user_memory else need

    def apply_budget(self, engine: Any, budget: int) -> int:
        """Set a weight-streaming budget and read it back (the binding drops the setter's verdict)."""
        engine.weight_streaming_budget_v2 = budget
        if int(engine.weight_streaming_budget_v2) != budget:
            raise KontextError(f"{self.plan}: the engine refused a weight-streaming budget of {budget} bytes: "
                               f"{trt_api.take_errors(self.pool.api)}")
        return budget

    def no_streamable_weights(self) -> str:
        """Why a weight-streaming budget cannot apply to this engine, and what to do."""
        if "--weight-streaming" in self.rebuild:
            return (f"the {self.name} engine was built with --weight-streaming but has no streamable weights "
                    f"({self.pool.api.folder} kept every weight on the device): run it without "
                    "--weight-streaming-budget")
        return (f"--weight-streaming-budget needs a {self.name} engine built with --weight-streaming; rebuild: "
                f"{self.rebuild} --weight-streaming")

    def unload(self) -> None:
        """Free the engine and its contexts once the device is done with them."""
        self.pool.sync()
        self.save_kernels()
        self.pool.resident.pop(self.name, None)
        self.exec_ctxs.clear()  # every context before its engine
        self.engine = None
        self.native_graphs = False
        self.events += 1

    def save_kernels(self) -> None:
        """Persist TensorRT-RTX's JIT kernels to the engine folder's runtime cache (TensorRT: nothing to do)."""
        if self.exec_ctxs and self.pool.runtime_cache is not None:
            trt_api.save_runtime_cache(next(iter(self.exec_ctxs.values())).made, self.pool.runtime_cache)

    def stream_handle(self) -> int:
        """The raw CUDA stream the engine runs on."""
        return self.pool.stream.cuda_stream

    def weight_target(self) -> RefitWeights:
        """What swaps this engine's weights (stages.RefitsWeights): its refit by name, made once (engines.trt_refit)."""
        from kontext_trt.engines.trt_refit import weight_target

        return weight_target(self)

    def streams_weights(self) -> bool:
        """Whether the engine streams weights now: a budget below its streamable weights (a budget that covers them
        all disables streaming: NvInferRuntime.h, ICudaEngine::setWeightStreamingBudgetV2)."""
        return self.weight_budget is not None and 0 <= self.budget_bytes < self.streamable_bytes

    def graph_refusal(self) -> str | None:
        """Why runtime.cudagraphs must not capture this stage now, or None if it may (asked after a warm-up run).

        A streaming engine is never captured: TensorRT's enqueueV3 turns synchronous and its graph is not capturable
        (NvInferRuntime.h, IExecutionContext::enqueueV3, 10.0 to 11.1), and TensorRT-RTX's own ONNX Runtime provider
        disables CUDA graphs under weight streaming (NVIDIA/TensorRT-RTX-EP-ABI v0.3.0). Only TensorRT-RTX can say
        whether a context is capturable (IExecutionContext.is_stream_capturable, TensorRT-RTX 1.2; datacenter
        TensorRT has no such call): there it is asked; on TensorRT the capture is tried, and a failed capture runs
        eagerly with its reason (runtime.cudagraphs)."""
        if self.streams_weights():
            return (f"the {self.name} engine streams weights (budget {self.budget_bytes} of {self.streamable_bytes} "
                    "streamable bytes): its runs are synchronous and cannot be captured")
        if self.native_graphs:
            return "TensorRT-RTX captures this engine's graphs itself (its contexts are not stream capturable)"
        if not self.pool.api.is_rtx:
            return None
        exec_ctx = next(reversed(self.exec_ctxs.values())).exec_ctx
        if not exec_ctx.is_stream_capturable(self.stream_handle()):
            return "the execution context is not stream capturable"
        return None

    def memory_stats(self) -> dict[str, int]:
        """Bytes: the plan, this engine's device memory (measured at load), its scratch need, the shared scratch, the
        pool's resident and peak figures, and the weight-streaming budget when streaming."""
        stats = {"engine_bytes": self.plan.stat().st_size, "resident": int(self.name in self.pool.resident),
                 "loads": self.loads, "exec_contexts": len(self.exec_ctxs), "weights_device_bytes": self.weights_bytes,
                 "scratch_need_bytes": self.scratch_need, "shared_scratch_bytes": self.pool.scratch_bytes,
                 "own_scratch": int(not self.user_memory), "pool_resident_bytes": self.pool.resident_bytes(),
                 "pool_peak_bytes": self.pool.peak_bytes}
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
