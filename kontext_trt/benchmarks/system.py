"""What a result was measured on: CPU, GPU, driver, CUDA, TensorRT, library versions and the git commit."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from kontext_trt.engines.skus import sku_for_device_name

PACKAGES = ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-rtx")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """The commit of the source tree this package runs from, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": None if commit is None else bool(git("status", "--porcelain"))}


def gpu_info(device: torch.device) -> dict | None:
    """GPU name, memory, compute capability, driver and its SKU-table entry; None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVML missing: the driver is simply not reported
        pass
    else:
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    sku = sku_for_device_name(props.name)
    return {"name": props.name, "memory_bytes": props.total_memory, "sm": props.major * 10 + props.minor,
            "driver": driver, "sku": sku.name if sku else None, "peak_tflops": dict(sku.peak_tflops) if sku else {}}


def system_info(device: torch.device) -> dict:
    """Everything about the machine and software that a figure depends on."""
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_info(device),
        "cuda": torch.version.cuda,
        "packages": {name: version(name) for name in PACKAGES},
        "git": git_commit(),
    }
