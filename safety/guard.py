"""Where results leave the toolkit: the input is checked before any stage runs, every output is checked, flagged
outputs are withheld, the rest are watermarked, and saved files get a signed C2PA manifest when credentials are
given. The CLI, the Python API and the server all go through `edit` and `save` here."""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from kontext_trt.runtime import flow
from kontext_trt.runtime.flow import Context, EditRequest, EditResult, Kontext, Prompt
from kontext_trt.runtime.timing import StageTimes
from kontext_trt.safety import watermark
from kontext_trt.safety.checker import ContentFlagged, SafetyChecker, Verdict, load_checker, run_checker
from kontext_trt.safety.provenance import MIME, NO_CERT_LINE, C2paCredentials, sign

log = logging.getLogger(__name__)

# Stage names these steps take in Kontext.times (the stage table and the bench).
CHECK_STAGE, MARK_STAGE, SIGN_STAGE = "safety_check", "watermark", "c2pa_sign"
SAFETY_STAGES = (CHECK_STAGE, MARK_STAGE, SIGN_STAGE)
MARK_NAME = f"dwtDct luma {watermark.PAYLOAD.decode()}"


@dataclass
class OutputPolicy:
    """What happens to results: the checker (None: off), the watermark, and C2PA credentials (None: no manifest)."""

    checker: SafetyChecker | None
    checker_name: str = "nudenet"
    watermark: bool = True
    c2pa: C2paCredentials | None = None

    @classmethod
    def from_options(cls, checker: str = "nudenet", c2pa_cert: Path | None = None, c2pa_key: Path | None = None,
                     device: torch.device | str = "cpu") -> "OutputPolicy":
        """The policy for --safety-checker, --c2pa-cert and --c2pa-key (without a certificate: one line says how)."""
        from kontext_trt.runtime.errors import KontextError

        if (c2pa_cert is None) != (c2pa_key is None):
            raise KontextError("give both --c2pa-cert and --c2pa-key, or neither")
        credentials = None if c2pa_cert is None else C2paCredentials.load(c2pa_cert, c2pa_key)
        return cls(load_checker(checker, device), checker, c2pa=credentials)


def pixels_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixel bytes (row-major), the id of an edit's input in metadata and C2PA."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def check(policy: OutputPolicy, images: list[Image.Image], times: StageTimes) -> list[Verdict] | None:
    """Verdicts for images (timed as a stage), or None when the checker is off."""
    if policy.checker is None:
        return None
    with times(CHECK_STAGE):
        return run_checker(policy.checker, images)


def check_input(policy: OutputPolicy, image: Image.Image, times: StageTimes) -> Verdict | None:
    """Refuse a flagged input image before anything else runs."""
    verdicts = check(policy, [image], times)
    if verdicts and verdicts[0].flagged:
        raise ContentFlagged("input image", verdicts)
    return verdicts[0] if verdicts else None


def mark(policy: OutputPolicy, images: list[Image.Image], times: StageTimes) -> tuple[list[Image.Image], str | None]:
    """Watermark images big enough to carry the mark; return them and what was marked (None: nothing)."""
    if not policy.watermark:
        return images, None
    if images[0].width * images[0].height < watermark.MIN_PIXELS:
        log.warning("outputs of %dx%d are under 256x256 pixels: written without the invisible watermark",
                    *images[0].size)
        return images, None
    with times(MARK_STAGE):
        return [watermark.embed(img) for img in images], MARK_NAME


def finish(policy: OutputPolicy, result: EditResult, times: StageTimes,
           input_verdict: Verdict | None = None) -> EditResult:
    """Check every output, watermark them, and record verdicts and mark in the metadata; if any output is flagged,
    raise ContentFlagged carrying the verdicts and the outputs that passed (watermarked, None where flagged)."""
    verdicts = check(policy, result.images, times)
    flagged = [bool(verdicts and verdicts[i].flagged) for i in range(len(result.images))]
    images, mark_name = mark(policy, result.images, times)
    if any(flagged):
        raise ContentFlagged("output", verdicts, [None if f else img for img, f in zip(images, flagged)])
    safety = {"checker": policy.checker_name if policy.checker is not None else "none",
              "input": input_verdict.to_dict() if input_verdict else None,
              "outputs": [v.to_dict() for v in verdicts] if verdicts else None}
    return replace(result, images=images, metadata={**result.metadata, "safety": safety, "watermark": mark_name})


def edit(k: Kontext, req: EditRequest, policy: OutputPolicy, prompt: Prompt | None = None,
         context: Context | None = None) -> EditResult:
    """flow.edit between the input check and the output checks and watermark."""
    flow.check_request(req)
    input_verdict = None if req.image is None else check_input(policy, req.image, k.times)
    result = flow.edit(k, req, prompt, context)
    if req.image is not None:
        result.metadata["input_sha256"] = pixels_sha256(req.image)
    return finish(policy, result, k.times, input_verdict)


def save(result: EditResult, out: str | Path, policy: OutputPolicy, times: StageTimes) -> list[Path]:
    """flow.save_images, signing a C2PA manifest into each file when the policy has credentials (else one line
    on stderr says how to add one)."""
    if policy.c2pa is None:
        paths = flow.save_images(result, out)
        print(NO_CERT_LINE, file=sys.stderr)
        return paths
    input_sha256 = result.metadata.get("input_sha256")

    def signed(data: bytes, path: Path) -> bytes:
        with times(SIGN_STAGE):
            return sign(data, MIME.get(path.suffix.lower(), "image/png"), path.name, policy.c2pa, input_sha256)

    return flow.save_images(result, out, finish=signed)
