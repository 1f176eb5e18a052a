"""Safety checkers: images in, one verdict per image out. NudeNet by default; any `module:callable` plugs in."""
from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from kontext_trt.core.errors import KontextError

log = logging.getLogger(__name__)

# NudeNet classes that block an image: exposed sexual body parts. Faces, feet, bellies, armpits, covered parts and
# exposed male chests are detected by the model but do not block.
NUDENET_LABELS = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
                  "ANUS_EXPOSED")
# A label blocks when some detection of it scores at least this (NudeNet's own detections start at 0.2; 0.5 trades
# a few misses for few false blocks; not tuned here, where no labelled data is at hand).
NUDENET_THRESHOLD = 0.5
NUDENET_SIZE = 320  # the shipped 320n.onnx: a YOLOv8n detector on 320x320 letterboxed RGB in [0, 1]
LICENSE_LINE = ("no safety checker: the FLUX.1 [dev] Non-Commercial License obliges you to filter or review "
                "outputs before you share them")


@dataclass(frozen=True)
class Verdict:
    """One image's verdict: the labels that block it with their scores (empty: the image passes)."""

    labels: dict[str, float] = field(default_factory=dict)
    checker: str = ""

    @property
    def flagged(self) -> bool:
        return bool(self.labels)

    def to_dict(self) -> dict:
        """JSON-ready, for PNG metadata and API responses."""
        return {"checker": self.checker, "flagged": self.flagged,
                "labels": {k: round(float(v), 4) for k, v in self.labels.items()}}


@runtime_checkable
class SafetyChecker(Protocol):
    """Anything called with a list of RGB images that returns one Verdict per image, in order."""

    def __call__(self, images: Sequence[Image.Image]) -> list[Verdict]: ...


class ContentFlagged(KontextError):
    """An input or output was flagged: `verdicts` holds one per checked image, `passed` the outputs that were not
    flagged (watermarked, None where flagged) for a caller that delivers a batch's clean part itself."""

    def __init__(self, what: str, verdicts: list[Verdict], passed: list[Image.Image | None] | None = None) -> None:
        labels = sorted({label for v in verdicts for label in v.labels})
        count = sum(v.flagged for v in verdicts)
        super().__init__(f"{what} flagged by the safety checker ({', '.join(labels)}): {count} of {len(verdicts)} "
                         f"image(s) withheld", code="content_policy_violation")
        self.what, self.verdicts, self.passed = what, verdicts, passed or []


class NudeNetChecker:
    """NudeNet 3.4's shipped 320n.onnx through this toolkit's ONNX Runtime (CUDA EP on a GPU, else CPU).

    A label's score is the highest confidence any of the detector's anchors gives it; labels of `labels` scoring at
    least `threshold` block the image. Pre-processing follows NudeNet's: pad right/bottom to a square, resize.
    """

    def __init__(self, threshold: float = NUDENET_THRESHOLD, labels: Sequence[str] = NUDENET_LABELS,
                 device: torch.device | str = "cpu") -> None:
        from kontext_trt.runtime.ort_stages import ort_session

        try:
            model = files("nudenet") / "320n.onnx"
        except ModuleNotFoundError:
            raise KontextError("the default safety checker needs NudeNet: pip install --no-deps nudenet==3.4.2 "
                               "(its own onnxruntime requirement would shadow onnxruntime-gpu), or pass "
                               "--safety-checker module:callable") from None
        self.session = ort_session(model, torch.device(device))
        self.input_name = self.session.get_inputs()[0].name
        names = ast.literal_eval(self.session.get_modelmeta().custom_metadata_map["names"])
        self.classes = [names[i] for i in range(len(names))]
        unknown = set(labels) - set(self.classes)
        if unknown:
            raise KontextError(f"NudeNet has no label {sorted(unknown)[0]}: choose from {', '.join(self.classes)}")
        self.threshold, self.labels = threshold, tuple(labels)

    def __call__(self, images: Sequence[Image.Image]) -> list[Verdict]:
        batch = np.stack([letterbox(img, NUDENET_SIZE) for img in images])
        out = self.session.run(None, {self.input_name: batch})[0]  # (B, 4 box + classes, anchors)
        scores = out[:, 4:, :].max(axis=2)  # (B, classes): each label's best anchor
        verdicts = []
        for row in scores:
            found = {label: float(row[self.classes.index(label)]) for label in self.labels}
            verdicts.append(Verdict({k: v for k, v in found.items() if v >= self.threshold}, "nudenet"))
        return verdicts


def letterbox(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) float32 RGB in [0, 1]: the image padded with black to a square (right/bottom), resized."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side))
    square.paste(image, (0, 0))
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    return pixels.transpose(2, 0, 1)


def load_checker(spec: str, device: torch.device | str = "cpu") -> SafetyChecker | None:
    """A --safety-checker value: nudenet, none (warns: the license obliges review), or module:callable (a class or
    factory is called with no arguments; a function or instance is used as it is)."""
    if spec == "nudenet":
        return NudeNetChecker(device=device)
    if spec == "none":
        log.warning(LICENSE_LINE)  # a warning that --quiet keeps (cli.main.set_log_level)
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise KontextError(f"--safety-checker {spec!r}: use nudenet, none or module:callable")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise KontextError(f"--safety-checker {spec}: cannot load it ({exc}); the module must be importable") from None
    checker = obj() if isinstance(obj, type) else obj
    if not isinstance(checker, SafetyChecker):
        raise KontextError(f"--safety-checker {spec}: not callable; it must take a list of images and return "
                           f"one Verdict per image")
    return checker


def run_checker(checker: SafetyChecker, images: Sequence[Image.Image]) -> list[Verdict]:
    """Call a checker and hold it to its contract: one Verdict per image."""
    verdicts = list(checker(list(images)))
    if len(verdicts) != len(images) or not all(isinstance(v, Verdict) for v in verdicts):
        raise KontextError(f"safety checker {checker!r} returned {len(verdicts)} results for {len(images)} images: "
                           f"it must return one kontext_trt.safety.checker.Verdict per image")
    return verdicts
