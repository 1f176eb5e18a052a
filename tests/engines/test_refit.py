"""build --refit: the export's weight map marks the refittable weights (TensorRT-RTX's parser, on this CPU host); what
cannot be built or refitted here is refused in one line."""
import json
import shutil

import pytest

from kontext_trt.cli.main import main
from kontext_trt.core.errors import KontextError
from kontext_trt.engines import refit, trt_api


@pytest.fixture(scope="module")
def transformer_onnx(tiny_onnx):
    return tiny_onnx / "transformer" / "model.onnx"


def test_every_mapped_weight_is_a_parser_weight_name(transformer_onnx, tiny_onnx):
    api = trt_api.load_api("tensorrt-rtx")
    net = trt_api.parse_onnx(api, transformer_onnx)
    config = net.builder.create_builder_config()
    weights = json.loads((tiny_onnx / "manifest.json").read_text())["stages"]["transformer"]["weights"]
    names = refit.refittable_names(transformer_onnx)
    assert names == sorted({w["name"] for w in weights.values()}) and len(names) == 112
    assert refit.mark_refittable(api, net.network, config, transformer_onnx) == len(names)
    assert all(net.network.are_weights_marked_refittable(name) for name in names)
    assert config.get_flag(api.trt.BuilderFlag.REFIT_INDIVIDUAL)
    assert not net.network.mark_weights_refittable("no_such_initializer")  # so a True above means the name exists


def test_rtx_refit_build_needs_a_gpu_here(capsys, tiny_onnx, tmp_path):
    # TensorRT-RTX 1.7.1 compiles refittable weights' kernels with CUDA even ahead of time: refused in one line.
    code = main(["build", "--onnx", str(tiny_onnx), "--out", str(tmp_path), "--sku", "rtx4090", "--stages",
                 "transformer", "--static", "64x64", "--refit"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "could not build a refittable engine without a GPU" in err
    assert not list(tmp_path.rglob("*.plan"))


@pytest.mark.parametrize("change,message", [
    (lambda e: e.update(precision="fp8"), "refitting quantized weights needs re-quantization"),
    (lambda e: e.pop("weights"), "has no weight map"),
])
def test_refusals(tiny_onnx, tmp_path, change, message):
    folder = tmp_path / "export"
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(tiny_onnx / "manifest.json", folder / "manifest.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest["stages"]["transformer"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KontextError, match=message) as info:
        refit.refittable_names(folder / "transformer" / "model.onnx")
    assert "\n" not in str(info.value)


def test_every_part_weight_is_a_parser_weight_name(tiny_onnx_split):
    """The step-cache parts' weight maps name the weights TensorRT-RTX's parser makes of each part."""
    from kontext_trt.core.stages import TRANSFORMER_PARTS

    api = trt_api.load_api("tensorrt-rtx")
    manifest = json.loads((tiny_onnx_split / "manifest.json").read_text())
    for part in TRANSFORMER_PARTS:
        path = tiny_onnx_split / manifest["stages"][part]["file"]
        net = trt_api.parse_onnx(api, path)
        names = refit.refittable_names(path)
        assert names and refit.mark_refittable(api, net.network, net.builder.create_builder_config(), path) == len(
            names)


def test_refit_builds_mark_the_parts_refittable(tiny_onnx_split, fake_tensorrt, monkeypatch, tmp_path):
    """build --refit on datacenter TensorRT (a stand-in module here): the transformer and each part are built
    refittable with exactly their mapped weights; the encoders are not."""
    from kontext_trt.core.stages import TRANSFORMER_PARTS
    from kontext_trt.engines import build, cache
    from kontext_trt.engines.profiles import Shapes
    from kontext_trt.engines.skus import SKUS

    trt = fake_tensorrt("10.14.1.48")
    monkeypatch.setattr(trt_api, "load_api", lambda flavor: trt_api.TrtApi("tensorrt", trt))
    stages = ("clip", "transformer", *TRANSFORMER_PARTS)
    folder, built = build.build_set(build.BuildRequest(
        onnx_dir=tiny_onnx_split, out=tmp_path, sku=SKUS["h100-sxm"], target=build.Target("tensorrt", (90,), 90),
        shapes=Shapes(((64, 64),), (1, 1)), stages=stages, flags=build.BuildFlags(refit=True)))
    manifest = cache.read_engine_manifest(folder)
    assert built == list(stages)
    assert {s: manifest.stages[s]["flags"]["refit"] for s in stages} == {s: s != "clip" for s in stages}
    export = json.loads((tiny_onnx_split / "manifest.json").read_text())["stages"]
    marked = {name for kind, name in trt._calls if kind == "refittable"}
    assert marked == {w["name"] for s in ("transformer", *TRANSFORMER_PARTS) for w in export[s]["weights"].values()}
