"""Seed-deterministic random weights and how the synthetic checkpoint writes them: safetensors files, shards, JSON."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

EMBEDDINGS = ("token_embedding.weight", "position_embedding.weight", "shared.weight", "relative_attention_bias.weight")


def random_weights(meta: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights with the names and shapes of `meta` (a meta-device state dict)."""
    return {name: random_tensor(name, tuple(t.shape), seed) for name, t in meta.items()}


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
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


def write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write `tensors` as `shards` safetensors shards (huggingface_hub's split, the smallest shard size that gives
    that many) and the index json, named as diffusers and transformers name them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    total = sum(nbytes(t) for t in tensors.values())
    size = -(-total // shards)
    while True:
        split = split_torch_state_dict_into_shards(tensors, filename_pattern=stem + "{suffix}.safetensors",
                                                   max_shard_size=size)
        if len(split.filename_to_tensors) <= shards:
            break
        size += max(1, size // 20)
    for file_name, names in split.filename_to_tensors.items():
        write_safetensors(folder / file_name, {name: tensors[name] for name in names})
    index = {"metadata": {**split.metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
    write_json(folder / f"{stem}.safetensors.index.json", index)


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as a safetensors file (safetensors.torch.save_file, `format: pt` metadata as diffusers has)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata={"format": "pt"})


def write_json(path: Path, value: dict) -> None:
    """JSON as the HF hub files are written: 2-space indent, sorted keys, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
