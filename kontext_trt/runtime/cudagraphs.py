"""CUDA graphs around one stage (named tensors in, named tensors out), for any backend: torch, TensorRT.

A graph is captured lazily, the first time the stage is called with a given input signature (names, shapes,
dtypes), and replayed for every later call of that signature: with a dynamic-profile engine that is one graph per
(batch, target + context tokens), replayed for every denoising step and every later request of that shape (how the
tokens split between target and context lives in the ids, which are data). Graphs sit in an LRU of `max_graphs`;
all are dropped when the stage's `graph_epoch` changes (an engine loaded or freed, its scratch memory moved). A
signature whose capture the stage refuses (`graph_refusal()`) or that fails to capture runs eagerly.

A replay copies into the graph's static input buffers only the inputs that are not the very tensor (unmodified)
copied last time: in the loop that is the step's latents and timestep; prompt embeddings, ids and guidance are the
same tensors every step. Outputs are cloned out of the graph's buffers, so callers see ordinary tensors.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kontext_trt.core.lru import LruCache
from kontext_trt.core.stages import SupportsGraphCapture

Key = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
Call = Callable[[], dict[str, torch.Tensor]]
log = logging.getLogger(__name__)

# The stage called once per step; the encoders and the VAE run once per edit, where replay saves little.
GRAPHED_STAGES = ("transformer", "transformer_head", "transformer_body", "transformer_tail")  # parts: --cache


def signature(inputs: dict[str, torch.Tensor]) -> Key:
    """The graph key of a call: each input's name, shape and dtype."""
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))


@dataclass
class Graph:
    """One captured call: its static input buffers, the output buffers it writes and the backend's handle."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    handle: Any
    sources: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # last tensor copied in, its version

    def load(self, inputs: dict[str, torch.Tensor]) -> None:
        """Copy into the static buffers every input that is not the tensor copied last time, unmodified."""
        for name, tensor in inputs.items():
            last, version = self.sources.get(name), _version(tensor)
            if version is None or last is None or last[0] is not tensor or last[1] != version:
                self.inputs[name].copy_(tensor)
                self.sources[name] = (tensor, version)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter; None for inference-mode tensors, which keep none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class TorchGraphs:
    """The capture backend: torch.cuda.CUDAGraph, one memory pool for all the graphs of one stage."""

    def __init__(self) -> None:
        self.pool = None  # made at the first capture, so that wrapping needs no GPU

    def warm_up(self, call: Call) -> None:
        """Run the call twice on a side stream and wait for it (once per signature): lazy initialisation (cuBLAS
        handles, JIT kernels, an engine's first run at a shape) must be done before capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, call: Call) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        """Record one call; thread-local capture mode lets library threads (JIT compilers) keep working meanwhile."""
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = call()
        return graph, outputs

    def replay(self, handle: torch.cuda.CUDAGraph) -> None:
        """Launch the graph on the current stream."""
        handle.replay()


class GraphedStage:
    """A stage whose calls replay CUDA graphs; the same named tensors in and out as the stage it wraps."""

    def __init__(self, stage: Callable[..., dict[str, torch.Tensor]], max_graphs: int = 8, backend: Any = None) -> None:
        self.stage = stage
        self.backend = backend if backend is not None else TorchGraphs()
        self.graphs = LruCache(max_graphs, on_evict=self._evicted)
        self.refusals: dict[Key, str] = {}
        self.counts: Counter = Counter()
        self.epoch = self._stage_epoch()

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._stage_epoch() != self.epoch:
            self.graphs.clear()
            self.counts["invalidations"] += 1
        key = signature(inputs)
        graph = self.graphs.get_or_make(key, lambda: self._capture(key, inputs))  # None: this signature runs eagerly
        if graph is None:
            self.counts["eager"] += 1
            return self.stage(**inputs)
        graph.load(inputs)
        self.backend.replay(graph.handle)
        self.counts["replays"] += 1
        return {name: tensor.clone() for name, tensor in graph.outputs.items()}

    def stats(self) -> dict:
        """Captures, replays, eager calls, evictions, invalidations, graphs held and why signatures run eagerly."""
        return {**{k: self.counts[k] for k in ("captures", "replays", "eager", "evictions", "invalidations")},
                "graphs": sum(g is not None for g in self.graphs.values()),
                "refusals": sorted(set(self.refusals.values()))}

    def _evicted(self, key: Key, graph: Graph | None) -> None:
        """Count a graph dropped from the cache (its memory stays in the pool for the next capture)."""
        self.counts["evictions"] += 1

    def _stage_epoch(self) -> Any:
        """The wrapped stage's graph epoch (None for stages whose buffers never move)."""
        return self.stage.graph_epoch if isinstance(self.stage, SupportsGraphCapture) else None

    def _capture(self, key: Key, inputs: dict[str, torch.Tensor]) -> Graph | None:
        """Warm up and capture one call on static copies of the inputs, or None (eager) if refused or failed."""
        static = {name: tensor.clone() for name, tensor in inputs.items()}

        def call() -> dict[str, torch.Tensor]:
            return self.stage(**static)

        before = self._stage_epoch()
        self.backend.warm_up(call)  # the stage's own errors (a shape outside the profile) surface here, uncaught
        refusal = self.stage.graph_refusal() if isinstance(self.stage, SupportsGraphCapture) else None
        if refusal is None:
            try:
                handle, outputs = self.backend.capture(call)
            except Exception as exc:  # CUDA or the library refused to capture: this signature runs eagerly
                refusal = f"capture failed: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
        if self._stage_epoch() != before:  # the warm-up loaded the engine or dropped another shape's context
            self.graphs.clear()
            self.counts["invalidations"] += 1
        self.epoch = self._stage_epoch()
        if refusal is not None:
            if refusal not in self.refusals.values():
                log.warning("CUDA graphs: %s runs eagerly for this input shape: %s", _name(self.stage), refusal)
            self.refusals[key] = refusal
            return None
        self.counts["captures"] += 1
        return Graph(static, outputs, handle, {name: (t, _version(t)) for name, t in inputs.items()})


def _name(stage: Any) -> str:
    """A stage's name for the log (its `name` attribute, else its type)."""
    return str(getattr(stage, "name", type(stage).__name__))


def graphed(stages: dict, names: tuple[str, ...] = GRAPHED_STAGES, max_graphs: int = 8) -> dict:
    """The stages with those named wrapped in a GraphedStage."""
    return {name: GraphedStage(stage, max_graphs) if name in names else stage for name, stage in stages.items()}
