"""Export bad inputs and failures: one-line KontextError (CLI exit 2), nothing half-written left behind."""
import json
import shutil

import onnx
import pytest
import torch

from kontext_trt.cli.main import main
from kontext_trt.core.errors import KontextError
from kontext_trt.core.files import LOCK_NAME
from kontext_trt.export import onnx_file
from kontext_trt.export.export import export_checkpoint
from kontext_trt.runtime.ort_stages import OrtStage


@pytest.mark.parametrize("kwargs,message", [
    ({"opset": 17}, "opset 17 is not supported"),
    ({"opset": 24}, "opset 24 is not supported"),
    ({"stages": ("clip", "unet")}, "unknown stage 'unet'"),
    ({"dtype": "fp16"}, "T5 overflows in fp16"),
    ({"dtype": "fp16", "stages": ("t5",)}, "T5 overflows in fp16"),
])
def test_bad_request_is_refused_before_any_work(tiny_ckpt, tmp_path, kwargs, message):
    with pytest.raises(KontextError, match=message):
        export_checkpoint(tiny_ckpt, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir(tiny_ckpt, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KontextError, match="is a file, not a folder: choose another --out"):
        export_checkpoint(tiny_ckpt, tmp_path / "file" / "out", stages=("clip",))


@pytest.mark.parametrize("argv,message", [
    (["--opset", "99"], "opset 99 is not supported"),
    (["--stages", "clip,vae"], "unknown stage 'vae'"),
    (["--dtype", "fp16", "--stages", "t5"], "T5 overflows in fp16"),
])
def test_cli_errors_are_one_line_exit_2(capsys, tiny_ckpt, tmp_path, argv, message):
    assert main(["export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_interrupted_write_leaves_no_partial_file(tiny_ckpt, tmp_path, monkeypatch):
    def fail_mid_write(module, stage, config, dtype, opset, folder, *text_length):
        (folder / "raw.onnx").write_bytes(b"\x08partial")
        (folder / "raw.onnx.data").write_bytes(b"\0" * 1024)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_file, "trace", fail_mid_write)
    out = tmp_path / "out"
    with pytest.raises(KontextError, match="clip: writing the ONNX failed .*No space left"):
        export_checkpoint(tiny_ckpt, out, stages=("clip",), dtype="fp32")
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == ["manifest.json", "tokenizer", "tokenizer_2"]
    assert json.loads((out / "manifest.json").read_text())["stages"] == {}


def run_clip(folder, ids):
    return OrtStage("clip", folder / "clip" / "model.onnx")(**ids)


def test_reexport_external_data_and_force(tiny_ckpt, tiny_onnx, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_onnx, out)
    export_checkpoint(tiny_ckpt, out, stages=("clip",), dtype="fp32", external_threshold=0)  # same checkpoint: replaces
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["clip"]["external_data"] and len(manifest["stages"]) == 5
    assert sorted(p.name for p in (out / "clip").iterdir()) == ["model.onnx", "model.onnx.data"]
    model = onnx.load(out / "clip" / "model.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx_file.weights(model))
    ids = {"input_ids": torch.randint(0, 400, (2, 77))}
    external, inline = run_clip(out, ids), run_clip(tiny_onnx, ids)
    assert all(torch.equal(external[k], inline[k]) for k in inline)

    manifest["checkpoint"] = {"path": "/elsewhere/finetune", "fingerprint": "0" * 64}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KontextError, match="holds an export of another checkpoint .*--force"):
        export_checkpoint(tiny_ckpt, out, stages=("clip",), dtype="fp32")
    assert json.loads((out / "manifest.json").read_text()) == manifest

    export_checkpoint(tiny_ckpt, out, stages=("clip",), dtype="fp32", force=True)
    after = json.loads((out / "manifest.json").read_text())
    assert after["checkpoint"]["fingerprint"] == json.loads((tiny_onnx / "manifest.json").read_text())["checkpoint"]["fingerprint"]
    assert list(after["stages"]) == ["clip"] and not after["stages"]["clip"]["external_data"]
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == ["clip", "manifest.json", "tokenizer", "tokenizer_2"]
    assert sorted(p.name for p in (out / "clip").iterdir()) == ["model.onnx"]
    assert all(torch.equal(run_clip(out, ids)[k], inline[k]) for k in inline)


@pytest.mark.slow  # a bf16 transformer export: ~12 s
def test_bf16_transformer_keeps_rope_and_ids_in_fp32(tiny_ckpt, tmp_path):
    out = tmp_path / "bf16"
    export_checkpoint(tiny_ckpt, out, stages=("transformer",), dtype="bf16")
    entry = json.loads((out / "manifest.json").read_text())["stages"]["transformer"]
    assert entry["dtype"] == "bf16"
    dtypes = {v["name"]: v["dtype"] for v in entry["inputs"] + entry["outputs"]}
    assert dtypes == {"hidden_states": "bfloat16", "encoder_hidden_states": "bfloat16", "pooled_projections": "bfloat16",
                      "timestep": "float32", "img_ids": "float32", "txt_ids": "float32", "guidance": "float32",
                      "latent": "bfloat16"}
    model = onnx.load(out / "transformer" / "model.onnx")
    assert onnx_file.float64_tensors(model.graph) == []
    matmul_inputs = {name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for name in n.input}
    weights = [t for t in model.graph.initializer if t.name in matmul_inputs]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    trig = [n.output[0] for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    assert trig and all(types[name] == onnx.TensorProto.FLOAT for name in trig)
    with pytest.raises(KontextError, match="onnxruntime backend runs fp32 exports"):
        OrtStage("transformer", out / "transformer" / "model.onnx")
