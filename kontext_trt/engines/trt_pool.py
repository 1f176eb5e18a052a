"""What the TensorRT stages of one pipeline share (runtime.trt_stages.EnginePool): the stream, the one scratch
allocation of every execution context, the TensorRT-RTX kernel cache, which engines are resident (low_vram: one at a
time), and the one-line out-of-memory errors naming the memory mode to try."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.engines import trt_api

if TYPE_CHECKING:
    from kontext_trt.engines.trt_stages import TrtStage

OOM_MARKERS = ("outofmemory", "cudaerrormemoryallocation", "memoryallocationfailed", "insufficientmemory",
               "failedtoallocate", "couldnotbeallocated")  # matched against the message lower-cased, without spaces


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

    def grow_scratch(self, need: int) -> None:
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
            stage.follow_scratch()

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
