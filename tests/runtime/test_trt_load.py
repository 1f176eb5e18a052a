"""Loading a TensorRT pipeline without a GPU: request geometry, the set's default geometry, tokenizers and config from
the export, and the CLI's one-line errors for engines that do not fit this GPU, library, size or precision."""
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from kontext_trt import assemble as pl
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.engines import cache, trt_api
from kontext_trt.engines import device as gpus
from kontext_trt.engines import select as es
from kontext_trt.runtime.flow import EditRequest

pytest.importorskip("tensorrt_rtx")
API = trt_api.load_api("tensorrt-rtx")


def test_request_geometry():
    image = im.sample_image(80, 64)
    assert pl.request_geometry(EditRequest(prompts=["a", "b"], image=image, auto_resize=False)) == \
        pl.Geometry(80, 64, 2, (80, 64))
    assert pl.request_geometry(EditRequest(prompts=["a"], image=image, width=96, height=64, auto_resize=False)) == \
        pl.Geometry(96, 64, 1, (80, 64))
    assert pl.request_geometry(EditRequest(prompts=["a"])) == pl.Geometry(1024, 1024, 1, None)


def test_default_geometry_is_the_sets_opt_edit(trt_engines):
    manifest = cache.read_engine_manifest(trt_engines / "rtx4090-sm89" / API.folder / "fp32")
    assert es.default_geometry(manifest) == pl.Geometry(96, 64, 1, (96, 64))


def test_tokenizers_and_config_come_from_the_export(trt_manifest, tiny_ckpt, tmp_path):
    (clip, t5), config = pl.engine_tokenizers_and_config(trt_manifest, None, None)
    assert clip.model_max_length and config.latent_channels == 16
    gone = replace(trt_manifest, onnx={**trt_manifest.onnx, "dir": str(tmp_path / "moved")})
    with pytest.raises(KontextError, match="pass --onnx EXPORT_DIR or --model CHECKPOINT"):
        pl.engine_tokenizers_and_config(gone, None, None)
    assert pl.engine_tokenizers_and_config(gone, None, tiny_ckpt)[1] == config


def edit_error(capsys, trt_engines, tmp_path, *extra) -> str:
    code = main(["edit", "--engines", str(trt_engines), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                 "--width", "64", "--height", "64", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a host without a GPU")
def test_cli_without_gpu(capsys, trt_engines, tmp_path):
    assert "runs TensorRT engines on an NVIDIA GPU and none is usable here" in edit_error(capsys, trt_engines, tmp_path)


@pytest.fixture
def rtx(monkeypatch):
    """Pretend this host has an RTX GPU (NVML and torch say so); returns a setter for the GPU."""
    def use(name: str, sm: int) -> None:
        monkeypatch.setattr(gpus, "detect_gpu", lambda: (gpus.Gpu(name, sm, 24.0, 0), ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return use


def test_cli_engines_for_another_gpu(capsys, trt_engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 5090", 120)
    err = edit_error(capsys, trt_engines, tmp_path)
    assert f"no engines for rtx5090-sm120/{API.folder}/bf16" in err and "rebuild: kontext-trt build" in err


def test_cli_engines_for_another_version(capsys, trt_engines, tmp_path, rtx, monkeypatch):
    rtx("NVIDIA GeForce RTX 4090", 89)
    newer = trt_api.TrtApi("tensorrt-rtx", SimpleNamespace(__version__="1.8.0.1"))

    def load_api(flavor):
        if flavor != "tensorrt-rtx":
            raise KontextError(f"{flavor} is not installed")
        return newer
    monkeypatch.setattr(trt_api, "load_api", load_api)
    err = edit_error(capsys, trt_engines, tmp_path)
    assert "no engines for rtx4090-sm89/tensorrt-rtx-1.8.0.1/bf16" in err
    assert f"built here: rtx4090-sm89/{API.folder}/fp32 (sizes 64x64,96x64" in err


def test_cli_size_outside_the_engines(capsys, trt_engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    err = edit_error(capsys, trt_engines, tmp_path, "--width", "128", "--height", "128")
    assert "transformer L=64 outside 16..48" in err and "--sizes 64x64,96x64,128x128" in err


def test_cli_memory_modes_need_engines(capsys, tiny_ckpt, tmp_path):
    code = main(["edit", "--model", str(tiny_ckpt), "--low-vram", "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "are TensorRT memory modes: add --engines DIR" in capsys.readouterr().err
    code = main(["edit", "--model", str(tiny_ckpt), "--cuda-graphs", "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--cuda-graphs replays on a GPU" in capsys.readouterr().err


def test_cli_precision_the_gpu_lacks(capsys, trt_engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    err = edit_error(capsys, trt_engines, tmp_path, "--precision", "nvfp4")
    assert "RTX 4090 cannot run nvfp4 engines: nvfp4 needs compute capability sm100" in err
    assert "(--precision fp8)" in err


def test_cli_several_precisions_built(capsys, trt_engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    root = tmp_path / "engines"
    shutil.copytree(trt_engines, root)
    base = root / "rtx4090-sm89" / API.folder
    shutil.copytree(base / "fp32", base / "fp8")
    assert f"{base} holds engine sets in fp32, fp8: pass --precision to pick one" in edit_error(capsys, root, tmp_path)
    assert cache.pick_precision(base, "fp8") == "fp8" and cache.pick_precision(base / "none", None) == "bf16"
    shutil.rmtree(base / "fp8")
    assert cache.pick_precision(base, None) == "fp32"


def test_cli_sku_of_another_architecture(capsys, trt_engines, tmp_path, rtx):
    rtx("NVIDIA H100 NVL", 90)
    assert "is not in the SKU table: pass --sku NAME" in edit_error(capsys, trt_engines, tmp_path)
    err = edit_error(capsys, trt_engines, tmp_path, "--sku", "rtx4090")
    assert "--sku rtx4090 engines are for sm89 and this GPU (NVIDIA H100 NVL) is sm90" in err
    err = edit_error(capsys, trt_engines, tmp_path, "--sku", "h100-sxm")  # same architecture: its engines are looked up
    assert "no engines for h100-sxm-sm90/" in err


def test_cli_engine_selection_needs_engines(capsys, tiny_ckpt, tmp_path):
    code = main(["edit", "--model", str(tiny_ckpt), "--precision", "fp8", "--prompt", "x",
                 "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--precision and --sku pick an engine set: add --engines DIR" in capsys.readouterr().err

