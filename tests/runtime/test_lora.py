"""LoRAs on the torch backend: reading (diffusers and kohya keys), errors, parity with diffusers' fuse_lora, and
exact swaps (tiny checkpoint, fp32)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec, parse_lora
from kontext_trt.runtime.flow import edit
from kontext_trt.runtime.lora import read_lora


@pytest.fixture(scope="module")
def torch_k(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32"))


def test_parse_lora():
    assert parse_lora("style.safetensors:0.8")[1] == 0.8
    assert parse_lora("dir/style.safetensors") == (parse_lora("dir/style.safetensors")[0], 1.0)
    assert parse_lora("c:/x:-1.5e-1")[1] == -0.15


def test_kohya_keys_read_as_the_diffusers_lora(tiny_loras):
    ours, kohya = read_lora(tiny_loras["a"]), read_lora(tiny_loras["kohya_a"])
    assert set(ours.layers) == set(kohya.layers) and len(ours.layers) == 2 * 12 + 2
    for module, layer in ours.layers.items():
        assert layer.scaling == 2.0  # lora_alpha 8 / r 4 from the PEFT metadata save_lora_weights wrote
        other = kohya.layers[module]  # kohya folds alpha into the factors
        product = layer.scaling * layer.up @ layer.down
        assert torch.allclose(other.scaling * other.up @ other.down, product, atol=1e-6)


def test_edit_matches_diffusers_fuse_lora(lora_request, tiny_ckpt, tiny_loras, lora_reference, tmp_path):
    reference = lora_reference
    lora_request.image.save(tmp_path / "in.png")
    for lora in (tiny_loras["a"], tiny_loras["kohya_a"]):
        out = tmp_path / f"{lora.stem}.png"
        code = main(["edit", "--model", str(tiny_ckpt), "--dtype", "fp32", "--lora", f"{lora}:0.8", "--prompt",
                     lora_request.prompts[0], "--image", str(tmp_path / "in.png"), "--out", str(out),
                     "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--no-auto-resize"])
        assert code == 0
        ours = np.asarray(Image.open(out))
        assert np.abs(ours.astype(int) - reference[0].astype(int)).max() <= 1
        name = "pytorch_lora_weights.safetensors" if lora.is_dir() else lora.name
        assert json.loads(Image.open(out).text["kontext-trt"])["loras"] == [{"file": name, "scale": 0.8}]


def test_lora_changes_the_edit_and_swaps_back_exactly(lora_request, torch_k, tiny_loras):
    params = {n: p.detach().clone() for n, p in torch_k.stages["transformer"].module.named_parameters()}
    base = edit(torch_k, lora_request).latents
    torch_k.set_loras([(tiny_loras["a"], 1.0)])
    with_a = edit(torch_k, lora_request).latents
    torch_k.set_loras([(tiny_loras["b"], 0.5), (tiny_loras["a"], 0.3)])
    with_ab = edit(torch_k, lora_request).latents
    torch_k.set_loras([])
    again = edit(torch_k, lora_request).latents
    assert (with_a - base).abs().max() > 1e-2 and (with_ab - with_a).abs().max() > 1e-2
    assert torch.equal(again, base) and not torch_k.info.loras
    for name, p in torch_k.stages["transformer"].module.named_parameters():
        assert torch.equal(p, params[name]), name


def test_several_loras_add_up(torch_k, tiny_loras):
    stage = torch_k.stages["transformer"]
    name = "transformer_blocks.0.attn.to_q.weight"
    base = stage.base_weight(name).clone()
    a, b = read_lora(tiny_loras["a"]), read_lora(tiny_loras["b"])
    module = name.removesuffix(".weight")
    torch_k.set_loras([(tiny_loras["a"], 0.7), (tiny_loras["b"], -0.2)])
    want = base + 0.7 * 2.0 * a.layers[module].up @ a.layers[module].down \
        - 0.2 * 2.0 * b.layers[module].up @ b.layers[module].down
    assert torch.allclose(stage._params()[name], want, atol=1e-6)
    torch_k.set_loras([])
    assert torch.equal(stage._params()[name], base)


def test_errors(torch_k, tiny_loras, tmp_path):
    cases = []
    cases.append(((tmp_path / "none.safetensors", 1.0), "no such LoRA file or folder"))
    (tmp_path / "two").mkdir()
    for n in ("x", "y"):
        save_file({"a": torch.zeros(1)}, tmp_path / "two" / f"{n}.safetensors")
    cases.append(((tmp_path / "two", 1.0), "holds 2 .safetensors files"))
    save_file({"foo.bar.weight": torch.zeros(2, 2)}, tmp_path / "unknown.safetensors")
    cases.append(((tmp_path / "unknown.safetensors", 1.0), "unknown LoRA key layout"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
              tmp_path / "big.safetensors")
    cases.append(((tmp_path / "big.safetensors", 1.0), "made for another model size"))
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              tmp_path / "te.safetensors")
    cases.append(((tmp_path / "te.safetensors", 1.0), "text-encoder LoRA weights"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    cases.append(((tmp_path / "bad.safetensors", 1.0), "not a readable safetensors LoRA"))
    for spec, message in cases:
        with pytest.raises(KontextError, match=message) as info:
            torch_k.set_loras([spec])
        assert "\n" not in str(info.value)


def test_cli_error_is_one_line(capsys, tiny_ckpt, tmp_path):
    code = main(["edit", "--model", str(tiny_ckpt), "--lora", str(tmp_path / "missing.safetensors:0.5"),
                 "--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "1", "--width", "64", "--height", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "no such LoRA file or folder" in err and err.count("\n") == 1


def test_bench_run_with_a_lora_records_it(tiny_ckpt, tiny_loras, tmp_path):
    import jsonschema

    from kontext_trt.benchmarks.report import SCHEMA_PATH

    code = main(["bench", "run", "--model", str(tiny_ckpt), "--lora", f"{tiny_loras['b']}:0.5", "--sizes", "64x64",
                 "--steps", "1", "--warmup", "0", "--iters", "1", "--dtype", "fp32", "--device", "cpu",
                 "--out", str(tmp_path)])
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert code == 0 and len(results) == 1
    assert results[0]["target"]["loras"] == [{"file": "pytorch_lora_weights.safetensors", "scale": 0.5}]
    jsonschema.validate(results[0], json.loads(SCHEMA_PATH.read_text()))
