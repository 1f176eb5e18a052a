"""Tokenizing prompts for CLIP (77 tokens) and T5 (the checkpoint's text length, at most 512 tokens): cut, pad,
truncate with a warning, no mask."""
from __future__ import annotations

import logging

import torch

CLIP_LEN = 77
T5_MAX_LEN = 512  # T5's trained length: a checkpoint's text length (KontextConfig.text_length) is capped here
# No CLIP or T5 token of ordinary text spans more characters than this: a prompt is cut to max_length * this many
# characters before it reaches the tokenizer, so a long prompt costs the tokenizer a bounded amount of work (a
# megabyte prompt is tokenized as its first 8 KiB for T5) and the first max_length tokens stay those of the whole.
MAX_CHARS_PER_TOKEN = 16
log = logging.getLogger(__name__)


def cut(prompt: str, max_length: int) -> str:
    """The part of a prompt a tokenizer of max_length tokens can read at all."""
    return prompt[:max_length * MAX_CHARS_PER_TOKEN]


def tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    """(B, max_length) int64 ids padded to max_length; prompts are cut (cut) before tokenizing, and those that
    overflow are truncated with a warning."""
    read = [cut(prompt, max_length) for prompt in prompts]
    batch = tokenizer(read, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(read, padding="longest", truncation=False, return_tensors="pt")
    if full.input_ids.shape[1] > max_length or read != prompts:
        log.warning("a prompt is longer than %s's %d tokens (%d%s); it was truncated", name, max_length,
                    full.input_ids.shape[1], "+" if read != prompts else "")
    return batch.input_ids.to(torch.int64)
