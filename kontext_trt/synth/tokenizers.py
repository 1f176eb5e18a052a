"""Tokenizers of the synthetic checkpoint, trained offline on data/corpus.txt: CLIP-style byte-level BPE and a T5
sentencepiece unigram, written in the files and conventions of the real snapshot."""
from __future__ import annotations

import io
import json
from pathlib import Path

from kontext_trt.core.text import T5_MAX_LEN
from kontext_trt.synth.weights import write_json

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_EXTRA_IDS = 100


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


def write_clip_tokenizer(folder: Path):
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
    write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS},
        "eos_token": {**special, "content": CLIP_EOS},
        "pad_token": CLIP_EOS,
        "unk_token": {**special, "content": CLIP_EOS},
    })
    write_json(folder / "tokenizer_config.json", {
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


def write_t5_tokenizer(folder: Path, max_length: int = T5_MAX_LEN):
    """tokenizer_2/: sentencepiece unigram (pad 0, eos 1, unk 2) + 100 extra ids, as T5TokenizerFast, whose
    model_max_length (the checkpoint's T5 text length) is max_length; returns it."""
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
    tokenizer = T5TokenizerFast.from_pretrained(folder, model_max_length=max_length, local_files_only=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(i): {**special, "content": tokenizer.convert_ids_to_tokens(i), "special": True} for i in range(3)}
    sentinel = {**special, "lstrip": True, "rstrip": True, "special": True}
    decoder |= {str(tokenizer.convert_tokens_to_ids(t)): {**sentinel, "content": t} for t in extra}
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extra,
        "eos_token": {**special, "content": "</s>"},
        "pad_token": {**special, "content": "<pad>"},
        "unk_token": {**special, "content": "<unk>"},
    })
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": max_length,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
