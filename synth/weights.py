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
    """Split sorted keys into `shards` contiguous groups of roughly equal bytes; write them and the index json."""
    names = sorted(tensors)
    total = sum(nbytes(tensors[n]) for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name in names:
        size = nbytes(tensors[name])
        groups[min(shards - 1, (done + size // 2) * shards // total)].append(name)
        done += size
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file_name = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file_name, {n: tensors[n] for n in group})
        weight_map.update(dict.fromkeys(group, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / f"{stem}.safetensors.index.json", index)


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors in sorted-name order as a safetensors file, streaming each tensor's bytes."""
    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        end = offset + nbytes(t)
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


def write_json(path: Path, value: dict) -> None:
    """JSON as the HF hub files are written: 2-space indent, sorted keys, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
