"""Input checks the CLI and the Python API share: each refuses a bad value in one line before any expensive work.

Numbers (finite floats, 64-bit seeds), text (valid UTF-8), devices (cpu, cuda[:N]) and output paths (an image file or
a folder that can really be written: probed with a temp file, so a read-only mount refuses even for root).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kontext_trt.core.errors import KontextError, flag_param
from kontext_trt.core.files import temp_path

SEED_MAX = 2**64 - 1
if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def check_finite(flag: str, value: float) -> None:
    """Refuse nan and inf for a float setting (param: the flag's field, --true-cfg -> true_cfg)."""
    if not math.isfinite(value):
        raise KontextError(f"{flag} {value} is not a finite number: pass a plain number like 2.5", flag_param(flag),
                           "invalid_value")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Refuse a seed torch's generator cannot take: 0..2**64-1."""
    if not 0 <= seed <= SEED_MAX:
        raise KontextError(f"{flag} {seed} is outside 0..{SEED_MAX} (2**64-1): pick a seed in that range",
                           flag_param(flag, "seed"), "out_of_range")


def check_text(flag: str, text: str) -> None:
    """Refuse text that is not valid UTF-8 (undecodable argv bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise KontextError(f"{flag} is not valid UTF-8 text{byte} at character {error.start}: pass the text in "
                           "UTF-8 (check the terminal's or the file's encoding)", flag_param(flag),
                           "invalid_value") from None


def pick_device(device: str | None) -> str:
    """--device as given (checked), or, when none is given, cuda where torch sees a GPU and cpu elsewhere, announced
    in one line: the one default of every subcommand and of the Python API."""
    import torch

    from kontext_trt.core.timing import announce

    if device is not None:
        check_device(device)
        return device
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    announce(f"device: {chosen} ({'a CUDA GPU is visible' if chosen == 'cuda' else 'no CUDA GPU is visible'}; "
             "--device cpu|cuda|cuda:N picks another)")
    return chosen


def check_device(device: str) -> None:
    """Refuse devices the project does not run on: cpu, cuda and cuda:N only."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise KontextError(f"--device {device}: kontext-trt runs on cpu or cuda (cuda:N picks a GPU)", "device",
                           "invalid_value")


def _probe(folder: Path, what: str, flag: str) -> None:
    """Create and delete a temp file in folder: the only test of writability that holds for root and read-only
    mounts alike."""
    probe = temp_path(folder / "probe")
    try:
        probe.touch(exist_ok=False)
    except OSError as error:
        raise KontextError(f"{what} cannot be written ({folder}: {error.strerror or error}): choose another "
                           f"{flag}", flag_param(flag, "out"), "not_writable") from None
    probe.unlink(missing_ok=True)


def _existing_ancestor(path: Path, what: str, flag: str) -> Path:
    """The nearest existing folder at or above path; a regular file on the way is refused."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise KontextError(f"{what}: {parent} is a file, not a folder: choose another {flag}",
                                   flag_param(flag, "out"), "invalid_value")
            return parent
    return Path(".")


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an image output path that cannot be written: an existing folder, a folder that is missing or a file, a
    read-only folder, or a suffix other than .png/.jpg/.jpeg/.webp."""
    path = Path(path)
    what = f"{flag} {path}"
    if path.is_dir():
        raise KontextError(f"{what} is a folder: give a file name, e.g. {path / 'edited.png'}",
                           flag_param(flag, "out"), "invalid_value")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise KontextError(f"{what}: the image format comes from the suffix: end it in "
                           f"{', '.join(IMAGE_SUFFIXES)}", flag_param(flag, "out"), "unsupported_format")
    parent = path.parent
    if _existing_ancestor(parent, what, flag) != parent:
        raise KontextError(f"{what}: output folder {parent} does not exist: create it or choose another {flag}",
                           flag_param(flag, "out"), "not_found")
    if path.exists() and not os.access(path, os.W_OK):
        raise KontextError(f"{what} is not writable: choose another {flag}", flag_param(flag, "out"), "not_writable")
    _probe(parent, what, flag)
    return path


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be made or written: a file, under a file, or read-only."""
    path = Path(path)
    what = f"{flag} {path}"
    if path.exists() and not path.is_dir():
        raise KontextError(f"{what} is a file, not a folder: choose another {flag}", flag_param(flag, "out"),
                           "invalid_value")
    _probe(_existing_ancestor(path, what, flag), what, flag)
    return path


def resolve_device(device: str) -> torch.device:
    """torch.device for a --device value, refusing cuda where no GPU is visible."""
    check_device(device)
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KontextError("--device cuda was given but no CUDA GPU is visible: use --device cpu", "device",
                           "gpu_unavailable")
    return dev
