"""Open, fingerprint and load a FLUX.1 Kontext [dev] checkpoint (diffusers folder or BFL single files), offline.

Weights are read with the safetensors library (mmap) and assigned straight into models built on the meta device
(accelerate's init_empty_weights), so a bf16 checkpoint loads in bf16 without a second host copy. Every user-facing problem is a one-line KontextError naming the file.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from kontext_trt.core.bfl_checkpoint import (
    transformer_config_from_shapes,
    transformer_to_diffusers,
    vae_config_from_shapes,
)
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, FLUX2_KLEIN, detect_family, family_named
from kontext_trt.core.files import read_json
from kontext_trt.core.flux_constants import HUB_ID, LATENT_CHANNELS, REFETCH, SCHEDULER_CONFIG, TRANSFORMER_IN_CHANNELS
from kontext_trt.core.text import T5_MAX_LEN

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

BFL_TRANSFORMER = "flux1-kontext-dev.safetensors"
BFL_AE = "ae.safetensors"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# Either file set loads, as in diffusers: the fast tokenizer.json that save_pretrained writes, or the slow originals.
TOKENIZER_FILES = {"tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                   "tokenizer_2": (("tokenizer.json",), ("spiece.model",))}
_FINGERPRINT_CHUNKS = 16
_FINGERPRINT_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder: its layout, component configs and every weight file."""

    root: Path
    layout: str  # "diffusers" | "bfl"
    transformer_config: dict
    vae_config: dict
    scheduler_config: dict
    files: tuple[Path, ...]
    text_length: int = T5_MAX_LEN  # T5 tokens a prompt is padded to: tokenizer_2's model_max_length, capped at 512
    family: str = "flux1-kontext"  # core.family: flux1-kontext or flux2-klein
    text_config: dict | None = None  # flux2-klein: text_encoder/config.json (Qwen3)
    pipeline_config: dict | None = None  # flux2-klein: model_index.json (is_distilled)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a local checkpoint's layout and topology from configs and safetensors headers; no weights read."""
    root = Path(path).expanduser()
    if not root.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)):
            raise KontextError(
                f"{path}: not a local folder; if it is a Hugging Face hub id, download it first with "
                f"`hf download {path} --local-dir DIR` and pass DIR",
                "model", "not_found"
            )
        raise KontextError(f"{root}: no such checkpoint folder; pass the local folder of {HUB_ID}",
                           "model", "not_found")
    if not root.is_dir():
        raise KontextError(
            f"{root}: is a file; pass the checkpoint folder that holds model_index.json or {BFL_TRANSFORMER}",
            "model", "invalid_value"
        )
    if (root / "model_index.json").is_file():
        family = detect_family(root)
        if family is not FLUX1_KONTEXT:
            from kontext_trt.core.klein_checkpoint import open_klein
            return open_klein(root)
        return _open_diffusers(root)
    if (root / BFL_TRANSFORMER).is_file():
        return _open_bfl(root)
    raise KontextError(
        f"{root}: holds neither model_index.json (diffusers layout) nor {BFL_TRANSFORMER} (BFL layout); "
        f"download the checkpoint with `hf download {HUB_ID} --local-dir {root}`",
        "model", "invalid_value"
    )


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over each weight file's name, size, safetensors header and 16 evenly spaced 64 KiB data chunks."""
    digest = hashlib.sha256()
    for path in ckpt.files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(ckpt.root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")  # the header length: checked by open_checkpoint
            f.seek(0)
            digest.update(f.read(data_start))
            last = max(data_start, size - _FINGERPRINT_CHUNK)
            for i in range(_FINGERPRINT_CHUNKS):
                f.seek(data_start + (last - data_start) * i // (_FINGERPRINT_CHUNKS - 1))
                digest.update(f.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def read_safetensors(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those whose name `keep` accepts), read through the library's mmap."""
    with _safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys() if keep is None or keep(name)}


def load_transformer(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """The FluxTransformer2DModel of `ckpt`, weights assigned from the mmap'd files in `dtype`."""
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=False):
        model = FluxTransformer2DModel.from_config(ckpt.transformer_config)
    if ckpt.layout == "bfl":
        files = [ckpt.root / BFL_TRANSFORMER]
        sd = transformer_to_diffusers(_read_cast(files, dtype), ckpt.transformer_config)
    else:
        files = _component_files(ckpt, "transformer")
        sd = _read_cast(files, dtype)
    return _assign(model, sd, files)


def load_vae(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> AutoencoderKL:
    """The AutoencoderKL of `ckpt` in `dtype`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with init_empty_weights(include_buffers=False):
        model = AutoencoderKL.from_config(ckpt.vae_config)
    if ckpt.layout == "bfl":
        files = [ckpt.root / BFL_AE]
        sd = convert_ldm_vae_checkpoint(_read_cast(files, dtype), ckpt.vae_config)
    else:
        files = _component_files(ckpt, "vae")
        sd = _read_cast(files, dtype)
    return _assign(model, sd, files)


def load_clip(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> CLIPTextModel:
    """The CLIPTextModel of `ckpt` in `dtype`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(ckpt.root / "text_encoder", local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(config)
    files = _component_files(ckpt, "text_encoder")
    sd = _read_cast(files, dtype)
    if not any(key.startswith("text_model.") for key in model.state_dict()):
        sd = {key.removeprefix("text_model."): t for key, t in sd.items()}
    return _assign(model, sd, files)


def load_t5(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> T5EncoderModel:
    """The T5EncoderModel of `ckpt` in `dtype` (bf16 or fp32: T5 overflows in fp16)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(ckpt.root / "text_encoder_2", local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = T5EncoderModel(config)
    files = _component_files(ckpt, "text_encoder_2")
    sd = _read_cast(files, dtype)
    if "shared.weight" in sd:
        sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])  # tied; saved once as shared.weight
    return _assign(model, sd, files)


def load_tokenizers(ckpt: Checkpoint) -> tuple[CLIPTokenizer | CLIPTokenizerFast, T5TokenizerFast]:
    """CLIP's and T5's tokenizers from the checkpoint's tokenizer/ and tokenizer_2/ folders; a FLUX.2 [klein]
    checkpoint's Qwen tokenizer (tokenizer/) and None."""
    family = family_named(ckpt.family)
    return load_family_tokenizers(family.name, {role: ckpt.root / name for role, name in family.tokenizers.items()})


def load_family_tokenizers(family: str, folders: dict[str, Path]) -> tuple:
    """A family's tokenizers from their folders ({role: folder}, core.family.Family.tokenizers): FLUX.1's CLIP and T5,
    or klein's Qwen tokenizer and None."""
    from kontext_trt.core.klein_checkpoint import load_qwen_tokenizer

    loaders = {FLUX1_KONTEXT.name: lambda: load_tokenizer_folders(folders["clip"], folders["t5"]),
               FLUX2_KLEIN.name: lambda: (load_qwen_tokenizer(folders["qwen"]), None)}
    return loaders[family]()


def load_tokenizer_folders(clip_folder: Path, t5_folder: Path) -> tuple[CLIPTokenizer | CLIPTokenizerFast,
                                                                          T5TokenizerFast]:
    """CLIP's and T5's tokenizers from whichever files their folders hold, as diffusers loads them: CLIP from
    vocab.json+merges.txt (slow) else tokenizer.json (fast, what save_pretrained writes); T5 from tokenizer.json, else
    spiece.model."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast, T5TokenizerFast

    slow = all((Path(clip_folder) / name).is_file() for name in TOKENIZER_FILES["tokenizer"][1])
    clip = (CLIPTokenizer if slow else CLIPTokenizerFast).from_pretrained(clip_folder, local_files_only=True)
    return clip, T5TokenizerFast.from_pretrained(t5_folder, local_files_only=True)


def _open_diffusers(root: Path) -> Checkpoint:
    """Validate a diffusers-layout folder (the HF snapshot)."""
    _load_json(root / "model_index.json")
    transformer_config = _load_json(root / "transformer" / "config.json")
    vae_config = _load_json(root / "vae" / "config.json")
    scheduler_config = _load_json(root / "scheduler" / "scheduler_config.json")
    _check_transformer(transformer_config, root / "transformer" / "config.json")
    _check_vae(vae_config, root / "vae" / "config.json")
    files = _weight_files(root / "transformer", "diffusion_pytorch_model")
    files += _weight_files(root / "vae", "diffusion_pytorch_model")
    files += _text_files(root)
    return Checkpoint(root, "diffusers", transformer_config, vae_config, scheduler_config, tuple(files),
                      _text_length(root))


def _open_bfl(root: Path) -> Checkpoint:
    """Validate a BFL-layout folder: the two single files plus the HF text encoder and tokenizer folders."""
    transformer_path, ae_path = root / BFL_TRANSFORMER, root / BFL_AE
    if not ae_path.is_file():
        raise KontextError(f"{ae_path}: missing; the BFL layout needs it beside {BFL_TRANSFORMER}; {REFETCH}",
                           "model", "not_found")
    transformer_config = transformer_config_from_shapes(_shapes(transformer_path), transformer_path)
    vae_config = vae_config_from_shapes(_shapes(ae_path), ae_path)
    _check_transformer(transformer_config, transformer_path)
    _check_vae(vae_config, ae_path)
    files = [transformer_path, ae_path, *_text_files(root)]
    return Checkpoint(root, "bfl", transformer_config, vae_config, dict(SCHEDULER_CONFIG), tuple(files),
                      _text_length(root))


def _text_files(root: Path) -> list[Path]:
    """Weight files of the CLIP and T5 folders, after checking their configs and tokenizer folders."""
    files = []
    for component in TEXT_COMPONENTS:
        _load_json(root / component / "config.json")
        files += _weight_files(root / component, "model")
    for component, choices in TOKENIZER_FILES.items():
        if not any(all((root / component / name).is_file() for name in names) for names in choices):
            wanted = " or ".join("+".join(names) for names in choices)
            raise KontextError(f"{root / component}: no tokenizer files ({wanted}); {REFETCH}", "model", "not_found")
    return files


def _text_length(root: Path) -> int:
    """T5's token count from tokenizer_2/tokenizer_config.json's model_max_length, capped at T5_MAX_LEN (512, what
    T5 was trained on; transformers' "unset" sentinel, about 1e30, reads as 512); no such file or key: 512."""
    path = root / "tokenizer_2" / "tokenizer_config.json"
    value = (read_json(path, fix=REFETCH) or {}).get("model_max_length", T5_MAX_LEN)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= T5_MAX_LEN:
        return T5_MAX_LEN
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1 or value != int(value):
        raise KontextError(f"{path}: model_max_length is {value!r}, not a token count; set it to the T5 prompt "
                           f"length the model was trained with (1 to {T5_MAX_LEN}) or {REFETCH}",
                           "model", "invalid_value")
    return int(value)


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """A component's safetensors files (sharded through `stem.safetensors.index.json` or single), headers checked."""
    index_path = folder / f"{stem}.safetensors.index.json"
    if not index_path.is_file():
        path = folder / f"{stem}.safetensors"
        if not path.exists():
            raise KontextError(f"{path}: missing (and no {index_path.name}); {REFETCH}", "model", "not_found")
        _shapes(path)
        return [path]
    weight_map = _load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise KontextError(f"{index_path}: has no weight_map; {REFETCH}", "model", "invalid_value")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.exists():
            raise KontextError(f"{path}: missing shard listed in {index_path.name}; {REFETCH}", "model", "not_found")
        shapes = _shapes(path)
        absent = [key for key, name in weight_map.items() if name == path.name and key not in shapes]
        if absent:
            raise KontextError(f"{path}: lacks tensor {absent[0]} that {index_path.name} places there; {REFETCH}",
                               "model", "invalid_value")
    return files


def _component_files(ckpt: Checkpoint, component: str) -> list[Path]:
    """The weight files of one component folder."""
    return [path for path in ckpt.files if path.parent == ckpt.root / component]


def _check_transformer(config: dict, source: Path) -> None:
    """Refuse transformers that are not FLUX.1 Kontext [dev] topology."""
    if config.get("in_channels") != TRANSFORMER_IN_CHANNELS:
        raise KontextError(
            f"{source}: in_channels is {config.get('in_channels')}, FLUX.1 Kontext [dev] has {TRANSFORMER_IN_CHANNELS} "
            f"(Fill/Canny/Depth variants differ); point at the {HUB_ID} checkpoint",
            "model", "model_mismatch"
        )
    if not config.get("guidance_embeds"):
        raise KontextError(
            f"{source}: no guidance embedding (guidance_embeds false: a FLUX.1 [schnell]-like model); "
            f"Kontext [dev] is guidance-distilled, point at the {HUB_ID} checkpoint",
            "model", "model_mismatch"
        )
    if config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0) <= 0:
        raise KontextError(f"{source}: num_attention_heads/attention_head_dim missing; {REFETCH}",
                           "model", "invalid_value")


def _check_vae(config: dict, source: Path) -> None:
    """Refuse autoencoders that do not have FLUX's 16 latent channels."""
    if config.get("latent_channels") != LATENT_CHANNELS:
        raise KontextError(
            f"{source}: latent_channels is {config.get('latent_channels')}, "
            f"the FLUX autoencoder has {LATENT_CHANNELS}; "
            f"use the ae/vae of {HUB_ID}",
            "model", "model_mismatch"
        )


def _read_cast(files: list[Path], dtype: torch.dtype, keep: Callable[[str], bool] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Tensors of all `files` (those `keep` accepts; others never read), read and cast shard by shard (no copy when
    already in `dtype`)."""
    tensors = {}
    for path in files:
        tensors.update((key, _cast(t, dtype)) for key, t in read_safetensors(path, keep).items())
    return tensors


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in `dtype`; others unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], files: list[Path]) -> nn.Module:
    """Assign `sd` into a meta-built `model` (strict) and return it in eval mode."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    where = files[0] if len(files) == 1 else files[0].parent
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KontextError(f"{where}: weights do not match {type(model).__name__} ({detail}); {REFETCH}",
                           "model", "invalid_value")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = (lines or [str(error).splitlines()[0]])[0]
        raise KontextError(f"{where}: weights do not fit its config ({detail}); {REFETCH}",
                           "model", "invalid_value") from None
    return model.eval().requires_grad_(False)


def _shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header."""
    with _safetensors(path) as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


@contextmanager
def _safetensors(path: Path) -> Iterator[safe_open]:
    """safetensors.safe_open on `path`; a missing, unreadable, corrupt or truncated file is one KontextError."""
    if not path.exists():
        raise KontextError(f"{path}: missing; {REFETCH}", "model", "not_found")
    try:
        with open(path, "rb"):  # names EACCES and a folder in words the library does not use
            pass
        handle = safe_open(path, framework="pt")
    except OSError as error:
        raise KontextError(f"{path} is unreadable ({error.strerror or error}); fix its permissions or "
                           f"{REFETCH}", "model", "unreadable") from None
    except SafetensorError as error:
        raise KontextError(f"{path}: {_safetensors_problem(str(error))}; {REFETCH}", "model", "invalid_value") from None
    with handle as f:
        yield f


def _safetensors_problem(message: str) -> str:
    """The safetensors library's header error in a user's words."""
    if "not fully covered" in message or "incomplete" in message:
        return "truncated safetensors (its header describes more bytes than the file holds)"
    if "UTF-8" in message or "JSON" in message.upper():
        return "corrupt safetensors (header is not JSON)"
    return f"corrupt safetensors ({message.split(': ', 1)[-1]})"


def _load_json(path: Path) -> dict:
    """A JSON object from `path`, or a KontextError naming it (missing, unreadable, not JSON, not an object)."""
    value = read_json(path, fix=REFETCH)
    if value is None:
        raise KontextError(f"{path}: missing; {REFETCH}", "model", "not_found")
    return value
