"""Opening, fingerprinting and loading checkpoints; every bad input is one KontextError line naming the file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from kontext_trt.core import checkpoint as ck
from kontext_trt.core.errors import KontextError

LOADERS = [ck.load_transformer, ck.load_vae, ck.load_clip, ck.load_t5]


def public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / ckpt.name))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_open_diffusers_layout(tiny_ckpt):
    ckpt = ck.open_checkpoint(tiny_ckpt)
    assert (ckpt.root, ckpt.layout) == (tiny_ckpt, "diffusers")
    assert ckpt.transformer_config["num_attention_heads"] == 2 and ckpt.vae_config["latent_channels"] == 16
    assert ckpt.scheduler_config == ck.SCHEDULER_CONFIG
    assert [p.relative_to(tiny_ckpt).as_posix() for p in ckpt.files] == [
        *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
        "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    ]


def test_open_bfl_layout_infers_the_same_configs(tiny_ckpt, tiny_bfl_ckpt):
    diffusers_layout, bfl = ck.open_checkpoint(tiny_ckpt), ck.open_checkpoint(tiny_bfl_ckpt)
    assert bfl.layout == "bfl"
    assert public(bfl.transformer_config) == public(diffusers_layout.transformer_config)
    assert public(bfl.vae_config) == public(diffusers_layout.vae_config)
    assert bfl.scheduler_config == diffusers_layout.scheduler_config
    assert [p.name for p in bfl.files[:2]] == ["flux1-kontext-dev.safetensors", "ae.safetensors"]
    assert len(bfl.files) == 5


def test_read_safetensors_is_exact_and_copy_on_write(tiny_ckpt):
    path = tiny_ckpt / "vae/diffusion_pytorch_model.safetensors"
    before = path.read_bytes()
    ours, reference = ck.read_safetensors(path), safetensors.torch.load_file(path)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    ours["decoder.conv_in.weight"].fill_(7)
    assert path.read_bytes() == before


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
def test_bfl_files_load_exactly_like_the_diffusers_folders(tiny_ckpt, tiny_bfl_ckpt, load):
    a = load(ck.open_checkpoint(tiny_ckpt)).state_dict()
    b = load(ck.open_checkpoint(tiny_bfl_ckpt)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.bfloat16}
    assert not any(t.is_meta for t in a.values())


@pytest.mark.parametrize("ours, reference, folder", [
    (ck.load_transformer, FluxTransformer2DModel, "transformer"),
    (ck.load_vae, AutoencoderKL, "vae"),
    (ck.load_clip, CLIPTextModel, "text_encoder"),
    (ck.load_t5, T5EncoderModel, "text_encoder_2"),
], ids=["transformer", "vae", "clip", "t5"])
def test_loaders_match_the_libraries_own_from_pretrained(tiny_ckpt, ours, reference, folder):
    model = ours(ck.open_checkpoint(tiny_ckpt), torch.float32)
    ref = reference.from_pretrained(tiny_ckpt / folder, torch_dtype=torch.float32, local_files_only=True)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dict(model.named_buffers()).keys() == dict(ref.named_buffers()).keys()
    assert all(torch.equal(x, y) for x, y in zip(model.buffers(), ref.buffers()))


def test_t5_embeddings_stay_tied(tiny_ckpt):
    t5 = ck.load_t5(ck.open_checkpoint(tiny_ckpt))
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()


def test_tokenizers_fit_the_text_encoders(tiny_ckpt):
    ckpt = ck.open_checkpoint(tiny_ckpt)
    clip_tok, t5_tok = ck.load_tokenizers(ckpt)
    assert len(clip_tok) == ck.load_clip(ckpt).config.vocab_size
    assert len(t5_tok) == ck.load_t5(ckpt).config.vocab_size
    assert (clip_tok.model_max_length, t5_tok.model_max_length) == (77, 512)


def test_fingerprint_is_stable_moves_with_the_folder_and_sees_weight_changes(tiny_ckpt, tmp_path):
    fingerprint = ck.checkpoint_fingerprint(ck.open_checkpoint(tiny_ckpt))
    assert len(fingerprint) == 64 and fingerprint == ck.checkpoint_fingerprint(ck.open_checkpoint(tiny_ckpt))
    moved = copy(tiny_ckpt, tmp_path)
    assert ck.checkpoint_fingerprint(ck.open_checkpoint(moved)) == fingerprint
    shard = moved / "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight, as a fine-tune or merged LoRA would change
    shard.write_bytes(bytes(data))
    assert ck.checkpoint_fingerprint(ck.open_checkpoint(moved)) != fingerprint


def test_fp32_load_is_the_exact_upcast(tiny_bfl_ckpt):
    ckpt = ck.open_checkpoint(tiny_bfl_ckpt)
    bf16, fp32 = ck.load_vae(ckpt).state_dict(), ck.load_vae(ckpt, torch.float32).state_dict()
    assert all(fp32[k].dtype == torch.float32 and torch.equal(fp32[k], bf16[k].float()) for k in bf16)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def huge_header_length(path: Path) -> None:
    path.write_bytes((2**60).to_bytes(8, "little") + path.read_bytes()[8:])


def drop_guidance(path: Path) -> None:
    sd = {k: v.clone() for k, v in ck.read_safetensors(path).items() if not k.startswith("guidance_in.")}
    safetensors.torch.save_file(sd, path)


DIFFUSERS_BREAKAGES = [
    ("transformer/diffusion_pytorch_model-00002-of-00003.safetensors", Path.unlink, "missing"),
    ("transformer/diffusion_pytorch_model-00003-of-00003.safetensors", truncate, "truncated"),
    ("vae/diffusion_pytorch_model.safetensors", garbage_header, "not JSON"),
    ("text_encoder/model.safetensors", huge_header_length, "corrupt"),
    ("transformer/config.json", lambda p: edit_json(p, guidance_embeds=False), "guidance"),
    ("transformer/config.json", lambda p: edit_json(p, in_channels=384), "in_channels"),
    ("vae/config.json", lambda p: edit_json(p, latent_channels=4), "latent_channels"),
    ("text_encoder_2", shutil.rmtree, "missing"),
    ("tokenizer", lambda p: (p / "merges.txt").unlink(), "no tokenizer files (tokenizer.json or vocab.json+merges.txt)"),
    ("tokenizer_2", lambda p: [(p / n).unlink() for n in ("tokenizer.json", "spiece.model")], "no tokenizer files"),
    # unreadable files: tests run as root, where chmod 000 stops nothing, so a folder stands where the file should be
    ("text_encoder/config.json", lambda p: (p.unlink(), p.mkdir()), "is unreadable (Is a directory)"),
    ("vae/diffusion_pytorch_model.safetensors", lambda p: (p.unlink(), p.mkdir()), "is unreadable (Is a directory)"),
    ("scheduler/scheduler_config.json", lambda p: p.write_text("{"), "not valid JSON"),
]
BFL_BREAKAGES = [
    ("ae.safetensors", truncate, "truncated"),
    ("ae.safetensors", Path.unlink, "missing"),
    ("flux1-kontext-dev.safetensors", drop_guidance, "guidance"),
    ("flux1-kontext-dev.safetensors", garbage_header, "not JSON"),
]


@pytest.mark.parametrize("layout, name, breakage, message", [
    *(("diffusers", *case) for case in DIFFUSERS_BREAKAGES),
    *(("bfl", *case) for case in BFL_BREAKAGES),
], ids=[f"{name}-{message}" for name, _, message in DIFFUSERS_BREAKAGES + BFL_BREAKAGES])
def test_bad_checkpoints_raise_one_line_naming_the_file(
    tiny_ckpt, tiny_bfl_ckpt, tmp_path, layout, name, breakage, message
):
    root = copy(tiny_ckpt if layout == "diffusers" else tiny_bfl_ckpt, tmp_path)
    breakage(root / name)
    with pytest.raises(KontextError) as caught:
        ck.open_checkpoint(root)
    text = str(caught.value)
    assert str(root / name) in text and message in text and "\n" not in text


def test_hub_id_says_how_to_download():
    expected = r"hf download black-forest-labs/FLUX\.1-Kontext-dev --local-dir"
    with pytest.raises(KontextError, match=expected):
        ck.open_checkpoint("black-forest-labs/FLUX.1-Kontext-dev")


def test_missing_empty_or_file_paths(tmp_path):
    with pytest.raises(KontextError, match="no such checkpoint folder"):
        ck.open_checkpoint(tmp_path / "nope")
    with pytest.raises(KontextError, match="neither model_index.json"):
        ck.open_checkpoint(tmp_path)
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(KontextError, match="is a file"):
        ck.open_checkpoint(tmp_path / "f.safetensors")


def test_weights_that_do_not_fit_the_config_fail_at_load(tiny_ckpt, tmp_path):
    root = copy(tiny_ckpt, tmp_path)
    edit_json(root / "transformer/config.json", num_layers=3)
    with pytest.raises(KontextError, match=r"transformer: weights do not match FluxTransformer2DModel \(missing"):
        ck.load_transformer(ck.open_checkpoint(root))
    edit_json(root / "transformer/config.json", num_layers=2, joint_attention_dim=48)
    with pytest.raises(KontextError, match="transformer: weights do not fit its config"):
        ck.load_transformer(ck.open_checkpoint(root))


RSS_PROBE = """
import json, resource, sys, torch
from kontext_trt.core.checkpoint import load_transformer, open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
from diffusers import FluxTransformer2DModel  # its import (~200 MB) is not the load's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_transformer(ckpt)
finite = all(bool(torch.isfinite(p.max())) for p in model.parameters())  # touches every weight page
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown": grown * 1024, "finite": finite, "dtype": str(model.dtype), "config": dict(model.config),
                  "x_embedder": list(model.x_embedder.weight.shape),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.slow
def test_slim_checkpoint_loads_real_widths_in_bf16_without_copies(slim_ckpt):
    root = slim_ckpt  # the slim preset, written once per run (tests/conftest.py)
    ckpt = ck.open_checkpoint(root)
    start = time.monotonic()
    ck.checkpoint_fingerprint(ckpt)
    assert time.monotonic() - start < 5
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root)], capture_output=True, text=True, check=True)
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "torch.bfloat16" and result["finite"]
    assert result["x_embedder"] == [3072, 64]
    assert (result["config"]["num_attention_heads"], result["config"]["attention_head_dim"]) == (24, 128)
    assert result["grown"] < 1.1 * result["bytes"], result  # measured 1.006x (safetensors' mmap, no second copy)


def saved_by_transformers(ckpt: Path, tmp_path: Path) -> Path:
    """The checkpoint as `pipe.save_pretrained` leaves it: tokenizer folders with tokenizer.json, no vocab/merges."""
    root = copy(ckpt, tmp_path)
    clip, t5 = ck.load_tokenizers(ck.open_checkpoint(root))
    for name, tokenizer in (("tokenizer", clip), ("tokenizer_2", t5)):
        shutil.rmtree(root / name)
        tokenizer.save_pretrained(root / name)
    return root


PROMPTS = ["make the house blue and add snow on the roof", "Ünïcödé, CAPS & punctuation!? 東京 123", ""]


def test_tokenizer_json_and_slow_files_give_identical_ids(tiny_ckpt, tmp_path):
    from kontext_trt.core.text import CLIP_LEN, T5_MAX_LEN, tokenize

    saved = saved_by_transformers(tiny_ckpt, tmp_path / "saved")
    assert sorted(p.name for p in (saved / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    spiece = copy(tiny_ckpt, tmp_path / "spiece")  # T5 from its sentencepiece model alone
    (spiece / "tokenizer_2" / "tokenizer.json").unlink()
    layouts = [ck.load_tokenizers(ck.open_checkpoint(root)) for root in (tiny_ckpt, saved, spiece)]
    for index, length in ((0, CLIP_LEN), (1, T5_MAX_LEN)):
        ids = [tokenize(pair[index], PROMPTS, length, "x") for pair in layouts]
        assert all(torch.equal(ids[0], other) for other in ids[1:])
        assert ids[0][0].ne(ids[0][2]).any()  # the prompts tokenize to something, not all padding


def test_unreadable_weight_file_is_one_line(tiny_ckpt, monkeypatch):
    """A file the user may not read (EACCES), simulated by monkeypatching open: root reads anything."""
    import builtins

    target = tiny_ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if Path(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(KontextError) as caught:
        ck.open_checkpoint(tiny_ckpt)
    assert str(caught.value).startswith(f"{target} is unreadable (Permission denied)") and "\n" not in str(caught.value)


@pytest.mark.parametrize("value,length", [(32, 32), (512, 512), (1000, 512), (1e30, 512), (77.0, 77), (None, 512)])
def test_text_length_is_tokenizer_2s_model_max_length_capped_at_512(tiny_ckpt, tmp_path, value, length):
    root = copy(tiny_ckpt, tmp_path)
    config = root / "tokenizer_2" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    if value is None:  # no key: 512, as with no tokenizer_config.json at all
        del data["model_max_length"]
    else:
        data["model_max_length"] = value
    config.write_text(json.dumps(data))
    assert ck.open_checkpoint(root).text_length == length
    config.unlink()
    assert ck.open_checkpoint(root).text_length == 512


def test_text_length_of_the_bfl_layout_and_the_real_snapshot(tiny_bfl_ckpt, tiny_ckpt):
    assert ck.open_checkpoint(tiny_bfl_ckpt).text_length == 512
    assert ck.open_checkpoint(tiny_ckpt).text_length == 512  # tokenizer_2 says 512, as FLUX.1 Kontext [dev]'s does


@pytest.mark.parametrize("value", [0, -3, 12.5, "32", True, float("nan")])
def test_a_bad_model_max_length_is_one_line(tiny_ckpt, tmp_path, value):
    root = copy(tiny_ckpt, tmp_path)
    edit_json(root / "tokenizer_2" / "tokenizer_config.json", model_max_length=value)
    with pytest.raises(KontextError, match=r"tokenizer_config.json: model_max_length is .*not a token count.*1 to 512"):
        ck.open_checkpoint(root)
