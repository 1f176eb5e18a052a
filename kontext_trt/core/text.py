"""Tokenizing prompts for CLIP (77 tokens) and T5 (512 tokens): pad, truncate with a warning, no mask."""
from __future__ import annotations

import logging

import torch

CLIP_LEN = 77
T5_LEN = 512
log = logging.getLogger(__name__)


def tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    """(B, max_length) int64 ids padded to max_length; prompts that overflow are truncated with a warning."""
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt")
    if full.input_ids.shape[1] > max_length:
        log.warning("a prompt is longer than %s's %d tokens (%d); it was truncated", name, max_length,
                    full.input_ids.shape[1])
    return batch.input_ids.to(torch.int64)
