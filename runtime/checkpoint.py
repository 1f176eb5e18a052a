"""Open, fingerprint and load a FLUX.1 Kontext [dev] checkpoint (diffusers folder or BFL single files), offline.

Weights are mmap'd safetensors assigned straight into models built on the meta device, so a bf16 checkpoint
loads in bf16 without a second host copy. Every user-facing problem is a one-line KontextError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from kontext_trt.runtime.files import read_json
from kontext_trt.runtime.errors import KontextError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"
BFL_TRANSFORMER = "flux1-kontext-dev.safetensors"
BFL_AE = "ae.safetensors"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# Either file set loads, as in diffusers: the fast tokenizer.json that save_pretrained writes, or the slow originals.
TOKENIZER_FILES = {"tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                   "tokenizer_2": (("tokenizer.json",), ("spiece.model",))}
# scheduler/scheduler_config.json of the real snapshot; BFL's get_schedule uses the same numbers.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.35.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
LATENT_CHANNELS = 16
TRANSFORMER_IN_CHANNELS = 64
# diffusers' convert_flux_transformer_checkpoint_to_diffusers splits single_blocks.N.linear1 as (3072,)*3 + (12288,).
_CONVERTER_LINEAR1_ROWS = 3 * 3072 + 4 * 3072
_FINGERPRINT_CHUNKS = 16
_FINGERPRINT_CHUNK = 64 * 1024
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_REFETCH = f"re-download it (hf download {HUB_ID} --local-dir DIR) or regenerate it"


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder: its layout, component configs and every weight file."""

    root: Path
    layout: str  # "diffusers" | "bfl"
    transformer_config: dict
    vae_config: dict
    scheduler_config: dict
    files: tuple[Path, ...]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a local checkpoint's layout and topology from configs and safetensors headers; no weights read."""
    root = Path(path).expanduser()
    if not root.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)):
            raise KontextError(
                f"{path}: not a local folder; if it is a Hugging Face hub id, download it first with "
                f"`hf download {path} --local-dir DIR` and pass DIR"
            )
        raise KontextError(f"{root}: no such checkpoint folder; pass the local folder of {HUB_ID}")
    if not root.is_dir():
        raise KontextError(
            f"{root}: is a file; pass the checkpoint folder that holds model_index.json or {BFL_TRANSFORMER}"
        )
    if (root / "model_index.json").is_file():
        return _open_diffusers(root)
    if (root / BFL_TRANSFORMER).is_file():
        return _open_bfl(root)
    raise KontextError(
        f"{root}: holds neither model_index.json (diffusers layout) nor {BFL_TRANSFORMER} (BFL layout); "
        f"download the checkpoint with `hf download {HUB_ID} --local-dir {root}`"
    )


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over each weight file's name, size, safetensors header and 16 evenly spaced 64 KiB data chunks."""
    digest = hashlib.sha256()
    for path in ckpt.files:
        size = path.stat().st_size
        _, data_start = _read_header(path)
        digest.update(f"{path.relative_to(ckpt.root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(data_start))
            last = max(data_start, size - _FINGERPRINT_CHUNK)
            for i in range(_FINGERPRINT_CHUNKS):
                f.seek(data_start + (last - data_start) * i // (_FINGERPRINT_CHUNKS - 1))
                digest.update(f.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as zero-copy views of a private (copy-on-write) mmap."""
    header, data_start = _read_header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(mapped, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
            tensors[name] = flat.view(shape)
    return tensors


def load_transformer(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """The FluxTransformer2DModel of `ckpt`, weights assigned from the mmap'd files in `dtype`."""
    from diffusers import FluxTransformer2DModel

    with _params_on_meta():
        model = FluxTransformer2DModel.from_config(ckpt.transformer_config)
    if ckpt.layout == "bfl":
        files = [ckpt.root / BFL_TRANSFORMER]
        sd = _bfl_transformer_to_diffusers(_read_cast(files, dtype), ckpt.transformer_config)
    else:
        files = _component_files(ckpt, "transformer")
        sd = _read_cast(files, dtype)
    return _assign(model, sd, files)


def load_vae(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> AutoencoderKL:
    """The AutoencoderKL of `ckpt` in `dtype`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with _params_on_meta():
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
    with _params_on_meta():
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
    with _params_on_meta():
        model = T5EncoderModel(config)
    files = _component_files(ckpt, "text_encoder_2")
    sd = _read_cast(files, dtype)
    if "shared.weight" in sd:
        sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])  # tied; saved once as shared.weight
    return _assign(model, sd, files)


def load_tokenizers(ckpt: Checkpoint) -> tuple[CLIPTokenizer | CLIPTokenizerFast, T5TokenizerFast]:
    """CLIP's and T5's tokenizers from the checkpoint's tokenizer/ and tokenizer_2/ folders."""
    return load_tokenizer_folders(ckpt.root / "tokenizer", ckpt.root / "tokenizer_2")


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
    return Checkpoint(root, "diffusers", transformer_config, vae_config, scheduler_config, tuple(files))


def _open_bfl(root: Path) -> Checkpoint:
    """Validate a BFL-layout folder: the two single files plus the HF text encoder and tokenizer folders."""
    transformer_path, ae_path = root / BFL_TRANSFORMER, root / BFL_AE
    if not ae_path.is_file():
        raise KontextError(f"{ae_path}: missing; the BFL layout needs it beside {BFL_TRANSFORMER}; {_REFETCH}")
    transformer_config = _bfl_transformer_config(_shapes(transformer_path), transformer_path)
    vae_config = _bfl_vae_config(_shapes(ae_path), ae_path)
    _check_transformer(transformer_config, transformer_path)
    _check_vae(vae_config, ae_path)
    files = [transformer_path, ae_path, *_text_files(root)]
    return Checkpoint(root, "bfl", transformer_config, vae_config, dict(SCHEDULER_CONFIG), tuple(files))


def _text_files(root: Path) -> list[Path]:
    """Weight files of the CLIP and T5 folders, after checking their configs and tokenizer folders."""
    files = []
    for component in TEXT_COMPONENTS:
        _load_json(root / component / "config.json")
        files += _weight_files(root / component, "model")
    for component, choices in TOKENIZER_FILES.items():
        if not any(all((root / component / name).is_file() for name in names) for names in choices):
            wanted = " or ".join("+".join(names) for names in choices)
            raise KontextError(f"{root / component}: no tokenizer files ({wanted}); {_REFETCH}")
    return files


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """A component's safetensors files (sharded through `stem.safetensors.index.json` or single), headers checked."""
    index_path = folder / f"{stem}.safetensors.index.json"
    if not index_path.is_file():
        path = folder / f"{stem}.safetensors"
        if not path.exists():
            raise KontextError(f"{path}: missing (and no {index_path.name}); {_REFETCH}")
        _read_header(path)
        return [path]
    weight_map = _load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise KontextError(f"{index_path}: has no weight_map; {_REFETCH}")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.exists():
            raise KontextError(f"{path}: missing shard listed in {index_path.name}; {_REFETCH}")
        header, _ = _read_header(path)
        absent = [key for key, name in weight_map.items() if name == path.name and key not in header]
        if absent:
            raise KontextError(f"{path}: lacks tensor {absent[0]} that {index_path.name} places there; {_REFETCH}")
    return files


def _component_files(ckpt: Checkpoint, component: str) -> list[Path]:
    """The weight files of one component folder."""
    return [path for path in ckpt.files if path.parent == ckpt.root / component]


def _check_transformer(config: dict, source: Path) -> None:
    """Refuse transformers that are not FLUX.1 Kontext [dev] topology."""
    if config.get("in_channels") != TRANSFORMER_IN_CHANNELS:
        raise KontextError(
            f"{source}: in_channels is {config.get('in_channels')}, FLUX.1 Kontext [dev] has {TRANSFORMER_IN_CHANNELS} "
            f"(Fill/Canny/Depth variants differ); point at the {HUB_ID} checkpoint"
        )
    if not config.get("guidance_embeds"):
        raise KontextError(
            f"{source}: no guidance embedding (guidance_embeds false: a FLUX.1 [schnell]-like model); "
            f"Kontext [dev] is guidance-distilled, point at the {HUB_ID} checkpoint"
        )
    if config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0) <= 0:
        raise KontextError(f"{source}: num_attention_heads/attention_head_dim missing; {_REFETCH}")


def _check_vae(config: dict, source: Path) -> None:
    """Refuse autoencoders that do not have FLUX's 16 latent channels."""
    if config.get("latent_channels") != LATENT_CHANNELS:
        raise KontextError(
            f"{source}: latent_channels is {config.get('latent_channels')}, "
            f"the FLUX autoencoder has {LATENT_CHANNELS}; "
            f"use the ae/vae of {HUB_ID}"
        )


def _bfl_transformer_config(shapes: dict[str, list[int]], source: Path) -> dict:
    """diffusers config of a BFL transformer file, inferred from tensor shapes.

    Rule: RoPE axes are (d/8, 7d/16, 7d/16) of the head dim d, which gives the real (16, 56, 56) for d = 128.
    """
    shapes = {key.removeprefix("model.diffusion_model."): shape for key, shape in shapes.items()}
    needed = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
              "double_blocks.0.img_attn.norm.query_norm.scale")
    for key in needed:
        if key not in shapes:
            raise KontextError(f"{source}: no tensor {key}, so not a FLUX transformer in BFL naming; {_REFETCH}")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    out_channels = shapes["final_layer.linear.weight"][0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": head_dim,
        "axes_dims_rope": [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "in_channels": in_channels,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "num_attention_heads": hidden // head_dim,
        "num_layers": _count_blocks(shapes, "double_blocks"),
        "num_single_layers": _count_blocks(shapes, "single_blocks"),
        "out_channels": None if out_channels == in_channels else out_channels,
        "patch_size": 1,
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
    }


def _bfl_vae_config(shapes: dict[str, list[int]], source: Path) -> dict:
    """diffusers AutoencoderKL config of BFL's ae.safetensors, inferred from tensor shapes.

    Rule: GroupNorm has 32 groups and the scaling/shift factors are FLUX's constants (neither is in the file).
    """
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
              "encoder.down.0.block.0.conv1.weight")
    for key in needed:
        if key not in shapes:
            raise KontextError(f"{source}: no tensor {key}, so not an LDM/BFL autoencoder; {_REFETCH}")
    num_blocks = _count_blocks(shapes, "encoder.down")
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(num_blocks)],
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "force_upcast": True,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": _count_blocks(shapes, "encoder.down.0.block"),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        "norm_num_groups": 32,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
    }


def _count_blocks(shapes: dict, prefix: str) -> int:
    """Number of distinct `prefix.N.` blocks."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m[1] for key in shapes if (m := pattern.match(key))})


def _bfl_transformer_to_diffusers(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL -> diffusers transformer keys through diffusers' converter.

    The converter hardcodes the real width when splitting single_blocks.N.linear1, so those are split here
    (as views) and the converter gets zero-size stand-ins whose outputs are replaced.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = {key.removeprefix("model.diffusion_model."): t for key, t in sd.items()}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    fused = {key: sd[key] for key in sd if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", key)}
    sd.update({key: torch.empty(_CONVERTER_LINEAR1_ROWS, 0) for key in fused})
    out = convert_flux_transformer_checkpoint_to_diffusers(sd)
    for key, tensor in fused.items():
        block, param = key.split(".")[1], key.rsplit(".", 1)[1]
        parts = tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden])
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
            out[f"single_transformer_blocks.{block}.{name}.{param}"] = part
    return out


def _read_cast(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of all `files`, read and cast shard by shard (no copy when already in `dtype`)."""
    tensors = {}
    for path in files:
        tensors.update((key, _cast(t, dtype)) for key, t in read_safetensors(path).items())
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
        raise KontextError(f"{where}: weights do not match {type(model).__name__} ({detail}); {_REFETCH}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = (lines or [str(error).splitlines()[0]])[0]
        raise KontextError(f"{where}: weights do not fit its config ({detail}); {_REFETCH}") from None
    return model.eval().requires_grad_(False)


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory, no init work) while buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header."""
    header, _ = _read_header(path)
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's validated header and the offset where its data starts."""
    if not path.exists():
        raise KontextError(f"{path}: missing; {_REFETCH}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > min(size - 8, _MAX_HEADER):
                raise KontextError(f"{path}: corrupt or truncated safetensors (header length {length}, file {size} "
                                   f"bytes); {_REFETCH}")
            raw = f.read(length)
    except OSError as error:
        raise KontextError(f"{path} is unreadable ({error.strerror or error}); fix its permissions or "
                           f"{_REFETCH}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KontextError(f"{path}: corrupt safetensors (header is not JSON); {_REFETCH}") from None
    if not isinstance(header, dict):
        raise KontextError(f"{path}: corrupt safetensors (header is not a JSON object); {_REFETCH}")
    data_size = size - 8 - length
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, data_size)
    return header, 8 + length


def _check_entry(path: Path, name: str, info: object, data_size: int) -> None:
    """Raise unless a header entry has a known dtype, a shape and offsets that fit the file."""
    try:
        itemsize = _DTYPES[info["dtype"]].itemsize
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = math.prod(int(d) for d in info["shape"]) * itemsize
    except (KeyError, TypeError, ValueError):
        raise KontextError(f"{path}: corrupt safetensors (bad header entry for {name}); {_REFETCH}") from None
    if end > data_size:
        raise KontextError(
            f"{path}: truncated safetensors ({name} ends at byte {end} of {data_size} data bytes); {_REFETCH}"
        )
    if not 0 <= begin <= end or end - begin != nbytes:
        raise KontextError(f"{path}: corrupt safetensors (offsets of {name} do not match its shape); {_REFETCH}")


def _load_json(path: Path) -> dict:
    """A JSON object from `path`, or a KontextError naming it (missing, unreadable, not JSON, not an object)."""
    value = read_json(path, fix=_REFETCH)
    if value is None:
        raise KontextError(f"{path}: missing; {_REFETCH}")
    return value
