"""Engine selection errors name the flag/field at fault (param) and a code: another GPU or SKU is gpu_mismatch, no
GPU gpu_unavailable, an engine set built for another GPU/TensorRT version gpu_mismatch, a size outside the profiles
out_of_range on `size`."""
import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.engines import device, select, trt_api
from kontext_trt.engines.cache import find_engines, pick_precision

RTX = trt_api.load_api("tensorrt-rtx").folder


def error_of(call) -> KontextError:
    with pytest.raises(KontextError) as info:
        call()
    assert "\n" not in info.value.message
    return info.value


def test_sku_and_gpu_errors(monkeypatch):
    h100 = device.Gpu("NVIDIA H100 80GB HBM3", 90, 80.0, 0)
    error = error_of(lambda: select.gpu_sku("rtx4090", h100))
    assert (error.param, error.code) == ("sku", "gpu_mismatch")
    assert "--sku rtx4090 engines are for sm89" in error.message
    error = error_of(lambda: device.resolve_sku("rtx9090", None))
    assert (error.param, error.code) == ("sku", "invalid_value")
    error = error_of(lambda: device.resolve_sku("auto", None, "NVML sees no GPU"))
    assert (error.param, error.code) == ("sku", "gpu_unavailable")
    error = error_of(lambda: device.resolve_sku("auto", device.Gpu("NVIDIA T4", 75, 16)))
    assert (error.param, error.code) == ("sku", "gpu_mismatch") and "is not in the SKU table" in error.message
    monkeypatch.setattr(device, "detect_gpu", lambda cuda_index=None: (None, "NVML sees no GPU"))
    error = error_of(select.cuda_gpu)
    assert (error.param, error.code) == ("engines", "gpu_unavailable")


def test_lookup_errors(built, tmp_path):
    base = dict(sku="rtx4090", flavor_version=RTX, precision="fp32", width=1024, height=1024, context=(1024, 1024))
    for change, param, code in [({"sku": "rtx5090"}, "engines", "gpu_mismatch"),
                                ({"flavor_version": "tensorrt-rtx-1.8.0.1"}, "engines", "gpu_mismatch"),
                                ({"precision": "fp16"}, "precision", "not_found"),
                                ({"width": 1536, "height": 1536, "context": None}, "size", "out_of_range"),
                                ({"batch": 2}, "n", "out_of_range")]:
        error = error_of(lambda: find_engines(built, **{**base, **change}))
        assert (error.param, error.code) == (param, code), (change, error.message)
        assert error.message.startswith("no engines for ")
    error = error_of(lambda: find_engines(tmp_path, **base))  # nothing built at all
    assert (error.param, error.code) == ("engines", "not_found")
    (tmp_path / "bf16").mkdir()
    (tmp_path / "fp32").mkdir()
    for precision in ("bf16", "fp32"):
        (tmp_path / precision / "manifest.json").write_text("{}")
    error = error_of(lambda: pick_precision(tmp_path, None))
    assert (error.param, error.code) == ("precision", "missing_argument")
