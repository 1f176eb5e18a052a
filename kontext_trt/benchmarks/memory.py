"""Memory figures: peak device memory (torch allocator, the driver's used bytes, per-stage hooks), peak host RSS,
engine sizes.

Hook for other backends: a stage that is a runtime.stages.SupportsMemoryStats (`memory_stats() -> dict[str, int]`,
bytes), e.g. a TensorRT stage; the figures are reported per stage under memory.stages.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kontext_trt.core.stages import SupportsMemoryStats

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def reset_peaks(device: torch.device) -> None:
    """Start a new peak window: the torch CUDA allocator's peaks and the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: VmHWM then keeps the process-lifetime peak


def host_peak_rss() -> int | None:
    """Peak resident set size of this process in bytes since the last reset (Linux VmHWM), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_used(device: torch.device) -> int | None:
    """Device memory in use on torch's GPU `device` (all processes: total less free, as the CUDA driver reports it),
    or None off CUDA. The driver's own figure for the very device torch runs on: no NVML index to get wrong."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


def memory_report(stages: dict, device: torch.device) -> dict:
    """Peaks since reset_peaks, the device's used bytes now and each stage's memory_stats() where it has one."""
    cuda = device.type == "cuda"
    return {
        "device_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "device_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "device_used_bytes": device_used(device),
        "host_peak_rss_bytes": host_peak_rss(),
        "stages": {name: stage.memory_stats() for name, stage in stages.items()
                   if isinstance(stage, SupportsMemoryStats)},
    }


def engine_sizes(folder: Path | None) -> dict[str, int] | None:
    """Bytes of each serialized engine under folder (relative path -> size), or None without --engines."""
    if folder is None:
        return None
    return {str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(Path(folder).rglob("*")) if p.suffix in ENGINE_SUFFIXES}
