"""Trained weights that ship with the package (data/<preset>/): the shapes model, written by `kontext-trt train
shapes`. <preset>.json holds the sizes (with the VAE's measured shift and scale) and the T5 text length;
<preset>.safetensors holds fp16 tensors named "<component>/<name>"."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_trt.core.errors import KontextError

DATA = Path(__file__).parent / "data"
TRAINED = ("shapes",)


@dataclass(frozen=True)
class TrainedPreset:
    """A shipped trained model: its sizes, text length, prompt-ids digest and weights by component."""

    sizes: dict
    text_length: int
    prompt_ids_sha256: str
    weights: dict[str, dict[str, torch.Tensor]]
    vae_psnr_db: float | None = None  # the VAE's reconstruction PSNR when it was trained


def trained_files(name: str, folder: Path | None = None) -> tuple[Path, Path]:
    """(<name>.json, <name>.safetensors) under `folder` (default: the shipped data/<name>/)."""
    folder = DATA / name if folder is None else Path(folder)
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def load_trained(name: str, folder: Path | None = None) -> TrainedPreset:
    """Read a trained preset, the shipped one or a training run's --out `folder`, or fail with one line saying how
    to make it."""
    from safetensors.torch import load_file

    info_path, weights_path = trained_files(name, folder)
    if not info_path.is_file() or not weights_path.is_file():
        raise KontextError(f"the {name} preset's trained weights are missing ({weights_path}): reinstall the package "
                           f"or retrain them with `kontext-trt train {name} --out DIR` and copy DIR's files there")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        component, _, tensor_name = key.partition("/")
        weights.setdefault(component, {})[tensor_name] = tensor
    return TrainedPreset(info["sizes"], info["text_length"], info["prompt_ids_sha256"], weights,
                         info.get("vae_psnr_db"))


def prompt_ids_digest(clip_tokenizer, t5_tokenizer, text_length: int) -> str:
    """sha256 of the shapes prompts' CLIP and T5 ids: trained weights are valid only with tokenizers giving these."""
    import hashlib

    from kontext_trt.core.text import CLIP_LEN, tokenize
    from kontext_trt.shapes.scenes import all_prompts

    prompts = all_prompts()
    ids = torch.cat([tokenize(clip_tokenizer, prompts, CLIP_LEN, "CLIP"),
                     tokenize(t5_tokenizer, prompts, text_length, "T5")], dim=1)
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()
