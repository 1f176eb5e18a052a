"""Device memory figures come from torch's device (no NVML index to get wrong); NVML, used for the driver version,
is shut down."""
import sys
import types

import torch

from kontext_trt.benchmarks import memory, system


def test_device_used_is_the_drivers_figure_for_torchs_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 * 2**30, 8 * 2**30))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # importing NVML would raise: it is not consulted
    assert memory.device_used(torch.device("cuda", 1)) == 5 * 2**30 and asked == [torch.device("cuda", 1)]
    assert memory.device_used(torch.device("cpu")) is None


def test_gpu_info_shuts_nvml_down(monkeypatch):
    calls = []
    nvml = types.SimpleNamespace(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
                                 nvmlSystemGetDriverVersion=lambda: "580.65")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    info = system.gpu_info(torch.device("cuda", 0))
    assert info["driver"] == "580.65" and info["sku"] == "h100-sxm" and calls == ["init", "shutdown"]
