"""GPU SKUs we build engines for: compute capability, memory, TensorRT flavour and dense peak TFLOP/s.

Peaks are NVIDIA datasheet figures for dense tensor-core math (no sparsity); GeForce figures are with
FP32 accumulate. A precision a SKU lacks has no entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sku:
    """One GPU model as the engine cache and the roofline see it."""

    name: str
    sm: int  # compute capability as an integer: 90 for 9.0
    memory_gib: int
    flavor: str  # "tensorrt" (datacenter) or "tensorrt-rtx" (RTX)
    nvml_names: tuple[str, ...]  # substrings of the NVML device name that identify it
    peak_tflops: dict[str, float] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The engine-cache folder name: <sku>-sm<cc>."""
        return f"{self.name}-sm{self.sm}"


SKUS: dict[str, Sku] = {
    s.name: s
    for s in (
        Sku("h100-sxm", 90, 80, "tensorrt", ("H100 80GB HBM3", "H100 SXM"), {"bf16": 989.4, "fp8": 1978.9}),
        Sku("h100-pcie", 90, 80, "tensorrt", ("H100 PCIe",), {"bf16": 756.0, "fp8": 1513.0}),
        Sku("h200", 90, 141, "tensorrt", ("H200",), {"bf16": 989.4, "fp8": 1978.9}),
        Sku("b200", 100, 180, "tensorrt", ("B200",), {"bf16": 2250.0, "fp8": 4500.0, "nvfp4": 9000.0}),
        Sku("l40s", 89, 48, "tensorrt", ("L40S",), {"bf16": 362.1, "fp8": 733.0}),
        Sku("a100", 80, 80, "tensorrt", ("A100",), {"bf16": 312.0}),
        Sku("rtx4090", 89, 24, "tensorrt-rtx", ("RTX 4090",), {"bf16": 165.2, "fp8": 330.3}),
        Sku("rtx5090", 120, 32, "tensorrt-rtx", ("RTX 5090",), {"bf16": 209.5, "fp8": 419.0, "nvfp4": 1676.0}),
    )
}


def sku_for_device_name(device_name: str) -> Sku | None:
    """The SKU whose NVML name pattern occurs in device_name, or None for a GPU we have no entry for."""
    for sku in SKUS.values():
        if any(pattern in device_name for pattern in sku.nvml_names):
            return sku
    return None


# The oldest compute capability with tensor-core support for each engine precision (NVIDIA support matrices).
PRECISION_MIN_SM: dict[str, int] = {"fp32": 0, "fp16": 0, "bf16": 80, "fp8": 89, "nvfp4": 100}
PRECISION_FALLBACK = {"nvfp4": "fp8 or bf16", "fp8": "bf16", "bf16": "fp16"}  # what such a GPU runs instead
ARCHITECTURES = ((120, "Blackwell RTX"), (100, "Blackwell"), (90, "Hopper"), (89, "Ada"), (80, "Ampere"),
                 (75, "Turing"))


def architecture(sm: int) -> str:
    """The GPU architecture name for a compute capability such as 89."""
    return next((name for first, name in ARCHITECTURES if sm >= first), "pre-Turing")


def precision_refusal(precision: str, sm: int) -> str | None:
    """Why an engine of this precision cannot run on compute capability sm, or None when it can."""
    need = PRECISION_MIN_SM.get(precision)
    if need is None:
        return f"unknown precision {precision}: use one of {', '.join(PRECISION_MIN_SM)}"
    if sm >= need:
        return None
    return (f"{precision} needs compute capability sm{need} ({architecture(need)}) or newer and sm{sm} "
            f"({architecture(sm)}) lacks it")
