"""The synthetic checkpoint: exact HF/BFL layout, deterministic bytes, loadable by diffusers, finite numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from PIL import Image
from transformers import CLIPTokenizer, T5TokenizerFast

from kontext_trt.core.bfl_keys import transformer_to_bfl, vae_to_ldm
from kontext_trt.core.checkpoint import read_safetensors
from kontext_trt.core.errors import KontextError
from kontext_trt.synth import write_synthetic_checkpoint

TEXT_FILES = {
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
}
DIFFUSERS_FILES = TEXT_FILES | {
    "model_index.json", "scheduler/scheduler_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}
BFL_FILES = TEXT_FILES | {"flux1-kontext-dev.safetensors", "ae.safetensors"}


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(read_safetensors(path))
    return out


def test_diffusers_layout_is_the_hf_snapshot(tiny_ckpt):
    assert files(tiny_ckpt) == DIFFUSERS_FILES


def test_bfl_layout_is_single_files_plus_text_folders(tiny_bfl_ckpt):
    assert files(tiny_bfl_ckpt) == BFL_FILES


def test_same_seed_same_bytes_other_seed_other_weights(tiny_ckpt, tmp_path):
    again = write_synthetic_checkpoint(tmp_path / "again", seed=0)
    other = write_synthetic_checkpoint(tmp_path / "other", seed=1)
    for name in DIFFUSERS_FILES:
        assert (again / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
        weights = name.endswith(".safetensors")
        assert ((other / name).read_bytes() != (tiny_ckpt / name).read_bytes()) == weights, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp build folders left behind"


def test_text_folders_are_identical_in_both_layouts(tiny_ckpt, tiny_bfl_ckpt):
    for name in TEXT_FILES:
        assert (tiny_bfl_ckpt / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name


def test_configs_match_the_real_snapshot(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    scheduler = json.loads((tiny_ckpt / "scheduler/scheduler_config.json").read_text())
    assert {k: v for k, v in scheduler.items() if k != "_diffusers_version"} == {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
        "shift": 3.0, "shift_terminal": None, "stochastic_sampling": False, "time_shift_type": "exponential",
        "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }
    transformer = json.loads((tiny_ckpt / "transformer/config.json").read_text())
    assert transformer["in_channels"] == 64 and transformer["guidance_embeds"] is True
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (2, 2)
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"] == 32
    vae = json.loads((tiny_ckpt / "vae/config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
    assert len(vae["down_block_types"]) == 4 and vae["norm_num_groups"] == 32


@pytest.mark.parametrize("folder, stem, shards", [
    ("transformer", "diffusion_pytorch_model", 3), ("text_encoder_2", "model", 2),
])
def test_shards_and_index_agree(tiny_ckpt, folder, stem, shards):
    index = json.loads((tiny_ckpt / folder / f"{stem}.safetensors.index.json").read_text())
    by_shard = {p.name: read_safetensors(p) for p in sorted((tiny_ckpt / folder).glob("*.safetensors"))}
    assert len(by_shard) == shards and all(by_shard.values())
    assert index["weight_map"] == {key: name for name, sd in by_shard.items() for key in sd}
    all_tensors = [t for sd in by_shard.values() for t in sd.values()]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_tensors)
    assert {t.dtype for t in all_tensors} == {torch.bfloat16}


def test_text_encoder_keys_follow_the_real_files(tiny_ckpt):
    clip = tensors(tiny_ckpt / "text_encoder")
    assert all(key.startswith("text_model.") for key in clip)
    t5 = tensors(tiny_ckpt / "text_encoder_2")
    assert "shared.weight" in t5 and "encoder.embed_tokens.weight" not in t5


def test_weight_scales(tiny_ckpt):
    sd = tensors(tiny_ckpt / "transformer")
    ff = sd["transformer_blocks.0.ff.net.0.proj.weight"].float()
    assert abs(ff.std().item() * ff.shape[1] ** 0.5 - 1) < 0.1
    assert sd["transformer_blocks.0.ff.net.0.proj.bias"].float().abs().max() < 0.2
    assert (sd["transformer_blocks.0.attn.norm_q.weight"].float() - 1).abs().max() < 0.5
    assert all(torch.isfinite(t.float()).all() for t in sd.values())


def test_diffusers_loads_it_and_numbers_stay_finite(tiny_ckpt):
    pipe = FluxKontextPipeline.from_pretrained(tiny_ckpt, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, pooled, _ = pipe.encode_prompt("make the sky purple", None, max_sequence_length=512)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all() and prompt_embeds.std() > 0
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.byte().numpy())
    latents = pipe(image=image, prompt="make the sky purple", height=64, width=64, max_area=64 * 64,
                   num_inference_steps=2, guidance_scale=2.5, _auto_resize=False, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 16, 64) and torch.isfinite(latents).all()
    decoded = pipe.vae.decode(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert decoded.shape == (1, 3, 64, 64) and torch.isfinite(decoded).all() and decoded.std() > 0


def test_clip_tokenizer_follows_clip_conventions(tiny_ckpt):
    tok = CLIPTokenizer.from_pretrained(tiny_ckpt / "tokenizer", local_files_only=True)
    config = json.loads((tiny_ckpt / "text_encoder/config.json").read_text())
    assert tok.model_max_length == 77 and len(tok) == config["vocab_size"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    assert tok.eos_token_id == len(tok) - 1  # CLIP's vocab ends with the two specials
    ids = tok("Replace the RED car", padding="max_length", max_length=77).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.pad_token_id and len(ids) == 77
    assert tok.convert_ids_to_tokens(ids[1:5]) == ["replace</w>", "the</w>", "red</w>", "car</w>"]


def test_t5_tokenizer_follows_t5_conventions(tiny_ckpt):
    tok = T5TokenizerFast.from_pretrained(tiny_ckpt / "tokenizer_2", local_files_only=True)
    config = json.loads((tiny_ckpt / "text_encoder_2/config.json").read_text())
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512 and len(tok) == config["vocab_size"]
    assert "<extra_id_0>" in tok.get_vocab() and "<extra_id_99>" in tok.get_vocab()
    ids = tok("Change the background to a sunny beach with palm trees.").input_ids
    assert ids[-1] == 1 and 2 not in ids


def test_text_length_is_tokenizer_2s_model_max_length(tiny_ckpt_t32, tiny_ckpt):
    tok = T5TokenizerFast.from_pretrained(tiny_ckpt_t32 / "tokenizer_2", local_files_only=True)
    assert tok.model_max_length == 32
    assert json.loads((tiny_ckpt_t32 / "tokenizer_2/tokenizer_config.json").read_text())["model_max_length"] == 32
    assert files(tiny_ckpt_t32) == DIFFUSERS_FILES  # otherwise the same checkpoint
    for name in ("transformer/config.json", "text_encoder_2/config.json", "tokenizer_2/spiece.model"):
        assert (tiny_ckpt_t32 / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    for bad in (0, 513, 32.0):
        with pytest.raises(KontextError, match="T5 reads 1 to 512 tokens"):
            write_synthetic_checkpoint(Path("unused"), text_length=bad)


def test_refuses_a_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KontextError, match="ckpt.*not empty.*force"):
        write_synthetic_checkpoint(out)
    assert (out / "keep.txt").exists()
    write_synthetic_checkpoint(out, force=True)
    assert not (out / "keep.txt").exists() and files(out) == DIFFUSERS_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_preset_or_format():
    with pytest.raises(KontextError, match="preset"):
        write_synthetic_checkpoint(Path("unused"), preset="huge")
    with pytest.raises(KontextError, match="format"):
        write_synthetic_checkpoint(Path("unused"), fmt="gguf")


def test_bfl_files_rekey_the_same_tensors(tiny_ckpt, tiny_bfl_ckpt):
    transformer = tensors(tiny_ckpt / "transformer")
    bfl = read_safetensors(tiny_bfl_ckpt / "flux1-kontext-dev.safetensors")
    expected = transformer_to_bfl(transformer)
    assert bfl.keys() == expected.keys() and all(torch.equal(bfl[k], expected[k]) for k in bfl)
    scale, shift = transformer["norm_out.linear.weight"].chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    vae = tensors(tiny_ckpt / "vae")
    ae = read_safetensors(tiny_bfl_ckpt / "ae.safetensors")
    assert ae.keys() == vae_to_ldm(vae).keys()
    assert ae["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(ae["decoder.up.3.block.0.conv1.weight"], vae["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert not any(key.startswith("first_stage_model.") for key in ae)


def test_transformer_to_bfl_is_inverted_by_diffusers_converter():
    # Real width (the converter hardcodes 3072 for single blocks); narrow columns keep it cheap: only rows are split.
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(t.shape[0], *([2] if t.ndim > 1 else []), generator=gen)
          for k, t in model.state_dict().items()}
    back = convert_flux_transformer_checkpoint_to_diffusers(transformer_to_bfl(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_vae_to_ldm_is_inverted_by_diffusers_converter(tiny_ckpt):
    vae = tensors(tiny_ckpt / "vae")
    config = json.loads((tiny_ckpt / "vae/config.json").read_text())
    back = convert_ldm_vae_checkpoint(vae_to_ldm(vae), config)
    assert back.keys() == vae.keys() and all(torch.equal(back[k], vae[k]) for k in vae)


def test_klein_tiny_preset_loads_without_flags_and_edits(tmp_path, capsys):
    """synth --preset klein-tiny: a diffusers-layout FLUX.2 [klein] (Qwen2 tokenizer built offline) that the CLI
    detects from model_index.json and edits with two references; its widths are not the parity tests'."""
    import sys

    from kontext_trt.cli.main import main
    from kontext_trt.core import image as im
    from kontext_trt.synth.klein import KLEIN_TINY

    sys.path.insert(0, str(Path(__file__).parents[1] / "klein"))
    from tiny_klein import PARITY_SIZES

    assert all(KLEIN_TINY[part] != PARITY_SIZES[part] for part in KLEIN_TINY)
    out = tmp_path / "klein"
    assert main(["synth", str(out), "--preset", "klein-tiny"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert (index["_class_name"], index["is_distilled"]) == ("Flux2KleinPipeline", True)
    assert json.loads((out / "transformer" / "config.json").read_text())["in_channels"] == 16
    assert {"tokenizer/tokenizer.json", "text_encoder/config.json", "vae/config.json"} <= files(out)
    refs = []
    for i, size in enumerate([(64, 64), (96, 80)]):
        refs.append(tmp_path / f"ref{i}.png")
        im.sample_image(*size, seed=i).save(refs[-1])
    result = tmp_path / "out.png"
    assert main(["edit", "--model", str(out), "--dtype", "fp32", "--image", str(refs[0]), "--image", str(refs[1]),
                 "--prompt", "add snow", "--steps", "2", "--safety-checker", "none", "--out", str(result)]) == 0
    meta = json.loads(Image.open(result).text["kontext-trt"])
    assert Image.open(result).size == (64, 64) and (meta["references"], meta["guidance"]) == (2, 4.0)
    with pytest.raises(KontextError, match="diffusers layout only"):
        write_synthetic_checkpoint(tmp_path / "bfl", preset="klein-tiny", fmt="bfl")
