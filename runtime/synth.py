"""Synthetic FLUX.1 Kontext [dev] checkpoints: random, seed-deterministic weights in the real snapshot's layout.

Each tensor is drawn from its own generator seeded by sha256(seed, name), so the weights do not depend on
library init order, and the BFL files are a re-keying of the very same tensors as the diffusers folders.
Tokenizers are trained offline on synth_data/corpus.txt.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kontext_trt.runtime.bfl_keys import transformer_to_bfl, vae_to_ldm
from kontext_trt.runtime.checkpoint import (
    BFL_AE,
    BFL_TRANSFORMER,
    SCHEDULER_CONFIG,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
)
from kontext_trt.runtime.errors import KontextError

CORPUS = Path(__file__).parent / "synth_data" / "corpus.txt"
DIFFUSERS_VERSION = "0.35.0.dev0"
TRANSFORMERS_VERSION = "4.43.3"
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_EXTRA_IDS = 100
MODEL_INDEX = {
    "_class_name": "FluxKontextPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
PRESETS = {
    "tiny": {
        "transformer": {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 14, 14]},
        "vae": {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1},
        "clip": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "projection_dim": 32},
        "t5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2},
    },
    "slim": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
                        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]},
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
        "clip": {"hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 3072,
                 "projection_dim": 768},
        "t5": {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 1, "num_decoder_layers": 1},
    },
}
TRANSFORMER_SHARDS, T5_SHARDS = 3, 2
EMBEDDINGS = ("token_embedding.weight", "position_embedding.weight", "shared.weight", "relative_attention_bias.weight")


def write_synthetic_checkpoint(
    out: Path, preset: str = "tiny", seed: int = 0, fmt: str = "diffusers", force: bool = False
) -> Path:
    """Write a random FLUX.1 Kontext [dev] checkpoint ("diffusers" folder or "bfl" single files) atomically to `out`."""
    out = Path(out)
    if preset not in PRESETS:
        raise KontextError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if fmt not in ("diffusers", "bfl"):
        raise KontextError(f"unknown checkpoint format {fmt!r}; choose diffusers or bfl")
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise KontextError(f"{out}: exists and is not empty; pick a new folder or pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_all(tmp, PRESETS[preset], seed, fmt)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_all(root: Path, preset: dict, seed: int, fmt: str) -> None:
    """Write every component, holding one component's weights at a time."""
    start = time.monotonic()
    clip_tokenizer = _write_clip_tokenizer(root / "tokenizer")
    t5_tokenizer = _write_t5_tokenizer(root / "tokenizer_2")
    _progress("tokenizers", root, start)
    _write_clip(root / "text_encoder", preset["clip"], clip_tokenizer, seed)
    _progress("text_encoder (CLIP)", root, start)
    _write_t5(root / "text_encoder_2", preset["t5"], len(t5_tokenizer), seed)
    _progress("text_encoder_2 (T5)", root, start)
    vae_config = _vae_config(preset["vae"])
    vae = _random_weights(_diffusers_model("AutoencoderKL", vae_config).state_dict(), seed)
    if fmt == "bfl":
        _write_safetensors(root / BFL_AE, vae_to_ldm(vae))
    else:
        _write_json(root / "vae" / "config.json", vae_config)
        _write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", vae)
    del vae
    _progress("vae", root, start)
    transformer_config = _transformer_config(preset["transformer"])
    transformer = _random_weights(_diffusers_model("FluxTransformer2DModel", transformer_config).state_dict(), seed)
    if fmt == "bfl":
        _write_safetensors(root / BFL_TRANSFORMER, transformer_to_bfl(transformer))
    else:
        _write_json(root / "transformer" / "config.json", transformer_config)
        _write_sharded(root / "transformer", "diffusion_pytorch_model", transformer, TRANSFORMER_SHARDS)
        _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        _write_json(root / "model_index.json", MODEL_INDEX)
    del transformer
    _progress("transformer", root, start)


def _progress(component: str, root: Path, start: float) -> None:
    """One progress line per finished component on stderr: bytes written so far and elapsed time."""
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    elapsed = time.monotonic() - start
    print(f"[synth] {component} done: {size / 2**20:.1f} MiB written, {elapsed:.1f}s", file=sys.stderr, flush=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`, replacing what is there."""
    if not out.exists():
        tmp.rename(out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    out.rename(trash / out.name)
    tmp.rename(out)
    shutil.rmtree(trash)


def _transformer_config(preset: dict) -> dict:
    """transformer/config.json as in the real snapshot, with the preset's sizes."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "guidance_embeds": True,
        "in_channels": 64,
        "out_channels": None,
        "patch_size": 1,
        **preset,
    }


def _vae_config(preset: dict) -> dict:
    """vae/config.json as in the real snapshot, with the preset's widths."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
        **preset,
    }


def _diffusers_model(class_name: str, config: dict) -> torch.nn.Module:
    """A diffusers model built on the meta device (names and shapes only)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name).from_config(config)


def _write_clip(folder: Path, preset: dict, tokenizer, seed: int) -> None:
    """text_encoder/: CLIP-L-style config with ids matching the tokenizer, and model.safetensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids(CLIP_EOS)
    config = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids(CLIP_BOS),
        "dropout": 0.0,
        "eos_token_id": eos,
        "hidden_act": "quick_gelu",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "pad_token_id": eos,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": len(tokenizer),
        **preset,
    }
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    # The real file keeps the historical `text_model.` prefix.
    names = {key if key.startswith("text_model.") else f"text_model.{key}": t for key, t in model.state_dict().items()}
    _write_json(folder / "config.json", config)
    _write_safetensors(folder / "model.safetensors", _random_weights(names, seed))


def _write_t5(folder: Path, preset: dict, vocab_size: int, seed: int) -> None:
    """text_encoder_2/: T5-v1.1-XXL-style encoder config and two shards (embed_tokens tied to shared, saved once)."""
    from transformers import T5Config, T5EncoderModel

    config = {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
        **preset,
    }
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    names = {key: t for key, t in model.state_dict().items() if key != "encoder.embed_tokens.weight"}
    _write_json(folder / "config.json", config)
    _write_sharded(folder, "model", _random_weights(names, seed), T5_SHARDS)


def _random_weights(meta: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights with the names and shapes of `meta` (a meta-device state dict)."""
    return {name: _tensor(name, tuple(t.shape), seed) for name, t in meta.items()}


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One weight from its own (seed, name) generator: N(0,1)/sqrt(fan_in), small biases/embeddings, norms near 1."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        value = 0.02 * noise
    elif len(shape) == 1:
        value = 1.0 + 0.05 * noise
    elif name.endswith(EMBEDDINGS):
        value = 0.02 * noise
    else:
        value = noise / math.prod(shape[1:]) ** 0.5
    return value.to(torch.bfloat16)


def _write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Split sorted keys into `shards` contiguous groups of roughly equal bytes; write them and the index json."""
    names = sorted(tensors)
    total = sum(_nbytes(tensors[n]) for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name in names:
        size = _nbytes(tensors[name])
        groups[min(shards - 1, (done + size // 2) * shards // total)].append(name)
        done += size
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file_name = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        _write_safetensors(folder / file_name, {n: tensors[n] for n in group})
        weight_map.update(dict.fromkeys(group, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / f"{stem}.safetensors.index.json", index)


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors in sorted-name order as a safetensors file, streaming each tensor's bytes."""
    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        end = offset + _nbytes(t)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(tensors[name].contiguous().view(torch.uint8).numpy())


def _write_json(path: Path, value: dict) -> None:
    """JSON as the HF hub files are written: 2-space indent, sorted keys, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _corpus() -> list[str]:
    """The shipped training corpus, one text per line."""
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bytes_to_unicode() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in CLIP/GPT-2 vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in [*printable, *(b for b in range(256) if b not in printable)]]


def _clip_merges() -> list[tuple[str, str]]:
    """CLIP-style BPE merges (`</w>` marks a word's last symbol) trained on the corpus with `tokenizers`.

    The trainer breaks count ties by symbol id, and it numbers `x</w>` symbols in hash-map order, so each
    word-final symbol is spelled as one private-use character while training: ids, hence merges, are stable.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    symbols = _bytes_to_unicode()
    final = {s: chr(0xE000 + i) for i, s in enumerate(symbols)}
    words = [
        word[:-1] + final[word[-1]]
        for line in _corpus()
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=[*symbols, *final.values()], show_progress=False)
    bpe.train_from_iterator(words, trainer)
    spelled = {v: k + "</w>" for k, v in final.items()}

    def respell(part: str) -> str:
        return "".join(spelled.get(c, c) for c in part)

    return [(respell(left), respell(right)) for left, right in json.loads(bpe.to_str())["model"]["merges"]]


def _write_clip_tokenizer(folder: Path):
    """tokenizer/: byte-level BPE with CLIP's conventions and vocab order; returns the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    merges = _clip_merges()
    symbols = _bytes_to_unicode()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS},
        "eos_token": {**special, "content": CLIP_EOS},
        "pad_token": CLIP_EOS,
        "unk_token": {**special, "content": CLIP_EOS},
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[CLIP_BOS]): {**special, "content": CLIP_BOS, "special": True},
            str(vocab[CLIP_EOS]): {**special, "content": CLIP_EOS, "normalized": False, "special": True},
        },
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    })
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _write_t5_tokenizer(folder: Path):
    """tokenizer_2/: sentencepiece unigram (pad 0, eos 1, unk 2) + 100 extra ids, as T5TokenizerFast; returns it."""
    import sentencepiece
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="unigram", vocab_size=2000,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5TokenizerFast.from_pretrained(folder, model_max_length=512, local_files_only=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(i): {**special, "content": tokenizer.convert_ids_to_tokens(i), "special": True} for i in range(3)}
    sentinel = {**special, "lstrip": True, "rstrip": True, "special": True}
    decoder |= {str(tokenizer.convert_tokens_to_ids(t)): {**sentinel, "content": t} for t in extra}
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extra,
        "eos_token": {**special, "content": "</s>"},
        "pad_token": {**special, "content": "<pad>"},
        "unk_token": {**special, "content": "<unk>"},
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
