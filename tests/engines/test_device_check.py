"""GPU detection through NVML, SKU resolution, the ONNX folder reader, and `kontext-trt check` without a GPU."""
import shutil
import sys
import types

import pytest

from kontext_trt.cli.main import main
from kontext_trt.core.errors import KontextError
from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.engines import device


def fake_nvml(name: str, cc: tuple[int, int], total: int, by_uuid: dict | None = None) -> types.ModuleType:
    """NVML with one GPU at index 0 and, by UUID, the GPUs of `by_uuid` ({'GPU-...': (name, cc, total)})."""
    gpus = {0: (name, cc, total), **(by_uuid or {})}
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.calls = []
    nvml.nvmlInit = lambda: nvml.calls.append("init")
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i

    def by_uuid_handle(uuid):
        if uuid not in gpus:
            raise nvml.NVMLError(f"NVML_ERROR_NOT_FOUND {uuid}")
        return uuid
    nvml.nvmlDeviceGetHandleByUUID = by_uuid_handle
    nvml.nvmlDeviceGetName = lambda h: gpus[h][0]
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h][1]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][2])
    return nvml


def test_detect_and_resolve(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml("NVIDIA L40S", (8, 9), 48 * 2**30))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu, why = device.detect_gpu()
    assert gpu == device.Gpu("NVIDIA L40S", 89, 48.0) and why == ""
    assert device.resolve_sku("auto", gpu).tag == "l40s-sm89"
    assert device.resolve_sku("rtx5090", gpu).tag == "rtx5090-sm120"  # by hand, for another machine
    with pytest.raises(KontextError, match="'NVIDIA T4' .* is not in the SKU table: pass --sku NAME"):
        device.resolve_sku("auto", device.Gpu("NVIDIA T4", 75, 16))
    with pytest.raises(KontextError, match="unknown SKU rtx9090"):
        device.resolve_sku("rtx9090", None)


@pytest.mark.parametrize("prefix", ["GPU-", "MIG-"])
def test_gpu_found_by_the_uuid_of_torchs_device(monkeypatch, prefix):
    """NVML index 0 is an L40S, but torch runs on CUDA device 1, an H100 (CUDA and NVML count differently): the SKU
    is the H100's, found through the UUID torch reports, and NVML is shut down."""
    import torch

    nvml = fake_nvml("NVIDIA L40S", (8, 9), 48 * 2**30,
                     {f"{prefix}6a1b": ("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="6a1b"))
    gpu, why = device.detect_gpu()
    assert gpu == device.Gpu("NVIDIA H100 80GB HBM3", 90, 80.0, cuda_index=1) and why == ""
    assert device.resolve_sku("auto", gpu).tag == "h100-sxm-sm90" and nvml.calls == ["init", "shutdown"]


def test_no_gpu_with_sku_auto():
    with pytest.raises(KontextError) as info:
        device.resolve_sku("auto", None, "NVML is not available")
    assert "none was found (NVML is not available)" in str(info.value) and "--sku rtx4090" in str(info.value)


def test_check_without_gpu_exits_2(built, engine_onnx, monkeypatch, capsys):
    monkeypatch.setattr(device, "detect_gpu", lambda: (None, "no NVIDIA driver on this host"))
    assert main(["check", "--engines", str(built), "--onnx", str(engine_onnx)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an NVIDIA GPU; none found (no NVIDIA driver on this host)" in err


def test_folder_without_manifest(engine_onnx, tmp_path):
    """A folder like BFL's published ONNX (no manifest, its own layout): stages and precision from the graphs."""
    for stage, sub in (("transformer", "transformer.opt/fp32"), ("vae_decoder", "vae.opt")):
        (tmp_path / sub).mkdir(parents=True)
        for f in (engine_onnx / stage).iterdir():
            shutil.copy(f, tmp_path / sub / f.name)
    found = read_onnx_dir(tmp_path)
    assert found.manifest is None and found.fingerprint is None and set(found.stages) == {"transformer", "vae_decoder"}
    t = found.pick("transformer", None)
    assert t.precision == "fp32" and t.shapes["txt_ids"] == (512, 3) and t.path.parent.name == "fp32"
    with pytest.raises(KontextError, match=r"no bf16 transformer ONNX .* \(found fp32\)"):
        found.pick("transformer", "bf16")


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU with NVML")
def test_detected_gpu_is_torchs_device():
    """On a GPU host: the GPU NVML describes is the one torch runs on (found by its UUID)."""
    import torch

    pytest.importorskip("pynvml", reason="NVML's Python binding (nvidia-ml-py, the trt/rtx/bench extras) is absent")

    gpu, why = device.detect_gpu()
    assert gpu is not None, why
    props = torch.cuda.get_device_properties(gpu.cuda_index)
    assert gpu.cuda_index == torch.cuda.current_device() and gpu.sm == 10 * props.major + props.minor
    assert gpu.name == props.name and abs(gpu.memory_gib - props.total_memory / 2**30) < 1


@pytest.mark.parametrize("name,sm,modules,message", [
    ("NVIDIA H100 80GB HBM3", 90, {"tensorrt": None}, "tensorrt is not usable here"),
    ("NVIDIA GeForce RTX 3080", 86, {}, "'NVIDIA GeForce RTX 3080' (sm86, 24 GiB) is not in the SKU table"),
    ("NVIDIA GeForce RTX 5090", 120, {"tensorrt_rtx": "no sm120"}, "cannot target sm120"),
])
def test_gpu_tests_skip_with_the_reason(monkeypatch, name, sm, modules, message):
    """What the CUDA tests' tensorrt_gpu fixture skips with: a datacenter GPU with only the dev extras' TensorRT-RTX,
    a GPU outside the SKU table, a TensorRT-RTX that cannot target the GPU; each one line."""
    import importlib
    import types

    import torch

    from kontext_trt.engines import select, trt_api

    monkeypatch.setattr(device, "detect_gpu", lambda cuda_index=None: (device.Gpu(name, sm, 24.0, 0), ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.import_module

    def import_module(module, *args):
        if modules.get(module) is None and module in modules:
            raise ImportError(f"No module named '{module}'")
        if modules.get(module) == "no sm120":  # the installed TensorRT-RTX, without SM120 among its targets
            rtx = real(module)
            return types.SimpleNamespace(__version__=rtx.__version__, ComputeCapability=types.SimpleNamespace(
                __members__={n: v for n, v in rtx.ComputeCapability.__members__.items() if n != "SM120"},
                **{n: v for n, v in rtx.ComputeCapability.__members__.items() if n != "SM120"}))
        return real(module, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(trt_api, "load_api", trt_api.load_api.__wrapped__)  # not the cached real module
    with pytest.raises(KontextError) as info:
        select.tensorrt_for_this_gpu()
    assert message in str(info.value) and "\n" not in str(info.value)
