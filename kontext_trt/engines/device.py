"""The GPU of this host through NVML, and the SKU an engine set is for."""
from __future__ import annotations

import os
from dataclasses import dataclass

from kontext_trt.core.errors import KontextError
from kontext_trt.engines.skus import SKUS, Sku, sku_for_device_name


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it, and torch's CUDA index of it (None when torch sees no CUDA device)."""

    name: str
    sm: int  # compute capability as an integer: 89 for 8.9
    memory_gib: float
    cuda_index: int | None = None


def torch_uuid(cuda_index: int | None) -> tuple[int, str] | None:
    """(torch's CUDA index, the device's UUID as CUDA reports it) of that CUDA device (default: the current one), or
    None when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if cuda_index is None else cuda_index
    return index, str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-")


def handle_by_cuda_uuid(pynvml, uuid: str):
    """NVML's handle of the device CUDA calls `uuid`: a GPU ('GPU-<uuid>') or a MIG instance ('MIG-<uuid>')."""
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except pynvml.NVMLError:
        return pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")


def detect_gpu(cuda_index: int | None = None) -> tuple[Gpu | None, str]:
    """(the GPU the engines run on, '') or (None, why there is none), read through NVML. The GPU is found by UUID:
    torch's CUDA device `cuda_index` (default: the current one), the very device the runtime executes on. Without a
    CUDA torch (a build host): the first CUDA_VISIBLE_DEVICES entry, by UUID when it is one, else as an NVML index
    (NVML counts in PCI bus order, as CUDA does with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML is not available ({exc}): no NVIDIA driver on this host"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None, "NVML sees no GPU"
        found = torch_uuid(cuda_index)
        if found is not None:
            index, uuid = found
            handle = handle_by_cuda_uuid(pynvml, uuid)
        else:
            index, visible = None, os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            if not visible:
                return None, "CUDA_VISIBLE_DEVICES hides every GPU"
            handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                      else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        return Gpu(name.decode() if isinstance(name, bytes) else name, 10 * major + minor, memory, index), ""
    except (pynvml.NVMLError, ValueError) as exc:
        return None, f"NVML could not read the GPU ({exc})"
    finally:
        pynvml.nvmlShutdown()


def resolve_sku(name: str, gpu: Gpu | None, why_no_gpu: str = "") -> Sku:
    """The SKU to build for: --sku NAME as given, or 'auto' from the GPU NVML found."""
    known = ", ".join(SKUS)
    if name != "auto":
        if name not in SKUS:
            raise KontextError(f"unknown SKU {name}: use one of {known} (or add it to engines/skus.py)",
                               "sku", "invalid_value")
        return SKUS[name]
    if gpu is None:
        raise KontextError(f"--sku auto needs a GPU and none was found ({why_no_gpu}): name the GPU the engines "
                           f"are for, e.g. --sku rtx4090 (one of {known})", "sku", "gpu_unavailable")
    sku = sku_for_device_name(gpu.name)
    if sku is None:
        raise KontextError(f"GPU '{gpu.name}' (sm{gpu.sm}, {gpu.memory_gib:.0f} GiB) is not in the SKU table: pass "
                           f"--sku NAME ({known}) or add it to engines/skus.py", "sku", "gpu_mismatch")
    if sku.sm != gpu.sm:
        raise KontextError(f"GPU '{gpu.name}' reports sm{gpu.sm} but SKU {sku.name} is sm{sku.sm}: fix engines/skus.py",
                           "sku", "gpu_mismatch")
    return sku
