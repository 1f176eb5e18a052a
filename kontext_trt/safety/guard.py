"""Where results leave the toolkit: the input is checked before any stage runs, every output is checked, flagged
outputs are withheld, the rest are watermarked, and saved files get a signed C2PA manifest when credentials are
given. The CLI goes through `edit` and `save`, the server through `input_verdicts`, `finish` and `signer`."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from kontext_trt.core.timing import StageTimes, note
from kontext_trt.runtime import flow
from kontext_trt.runtime.flow import Context, EditRequest, EditResult, Kontext, Prompt
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
        from kontext_trt.core.errors import KontextError

        if (c2pa_cert is None) != (c2pa_key is None):
            raise KontextError("give both --c2pa-cert and --c2pa-key, or neither")
        credentials = None if c2pa_cert is None else C2paCredentials.load(c2pa_cert, c2pa_key)
        return cls(load_checker(checker, device), checker, c2pa=credentials)


def pixels_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixel bytes (row-major), the id of an edit's input in metadata and C2PA."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def check(policy: OutputPolicy, images: list[Image.Image], times: StageTimes) -> list[Verdict] | None:
    """Verdicts for images (timed as a stage), or None when the checker is off."""
    if policy.checker is None or not images:
        return None
    with times(CHECK_STAGE):
        return run_checker(policy.checker, images)


def input_verdicts(policy: OutputPolicy, reqs: list[EditRequest], times: StageTimes) -> list[Verdict | None]:
    """One checker call over every input image of the requests, each reference included; a request's verdict holds
    each label at its highest score over its images (None: no image, or the checker is off)."""
    verdicts = check(policy, [img for req in reqs for img in req.images], times)
    if verdicts is None:
        return [None] * len(reqs)
    each = iter(verdicts)
    return [worst([next(each) for _ in req.images]) if req.images else None for req in reqs]


def worst(verdicts: list[Verdict]) -> Verdict:
    """One verdict for several images: every label any of them has, at its highest score."""
    labels: dict[str, float] = {}
    for verdict in verdicts:
        for label, score in verdict.labels.items():
            labels[label] = max(score, labels.get(label, score))
    return Verdict(labels, verdicts[0].checker)


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


def finish(policy: OutputPolicy, req: EditRequest, result: EditResult, times: StageTimes,
           input_verdict: Verdict | None = None) -> EditResult:
    """Check every output, then `finish_checked`."""
    return finish_checked(policy, req, result, times, input_verdict, check(policy, result.images, times))


def finish_checked(policy: OutputPolicy, req: EditRequest, result: EditResult, times: StageTimes,
                   input_verdict: Verdict | None, verdicts: list[Verdict] | None) -> EditResult:
    """Outputs checked (`verdicts`, None when the checker is off): watermark them, and record verdicts, mark and
    input hash in the metadata; if any output is flagged, raise ContentFlagged carrying the verdicts and the outputs
    that passed (watermarked, None where flagged)."""
    flagged = [bool(verdicts and verdicts[i].flagged) for i in range(len(result.images))]
    if all(flagged):  # nothing to deliver: nothing to mark
        raise ContentFlagged("output", verdicts, [None] * len(flagged))
    images, mark_name = mark(policy, result.images, times)
    if any(flagged):
        raise ContentFlagged("output", verdicts, [None if f else img for img, f in zip(images, flagged)])
    safety = {"checker": policy.checker_name if policy.checker is not None else "none",
              "input": input_verdict.to_dict() if input_verdict else None,
              "outputs": [v.to_dict() for v in verdicts] if verdicts else None}
    extra = {"safety": safety, "watermark": mark_name}
    if req.image is not None:
        extra["input_sha256"] = pixels_sha256(req.image)
    return replace(result, images=images, metadata={**result.metadata, **extra})


def edit(k: Kontext, req: EditRequest, policy: OutputPolicy, prompt: Prompt | None = None,
         context: Context | None = None) -> EditResult:
    """flow.edit between the input check (a flagged input raises before any stage runs) and `finish`."""
    flow.check_request(req)
    [input_verdict] = input_verdicts(policy, [req], k.times)
    if input_verdict is not None and input_verdict.flagged:
        raise ContentFlagged("input image", [input_verdict])
    return finish(policy, req, flow.edit(k, req, prompt, context), k.times, input_verdict)


def signer(policy: OutputPolicy, result: EditResult, times: StageTimes) -> Callable[[bytes, str], bytes] | None:
    """What signs an encoded output file (bytes, file name -> signed bytes), or None without credentials."""
    if policy.c2pa is None:
        return None
    input_sha256 = result.metadata.get("input_sha256")

    def signed(data: bytes, name: str) -> bytes:
        with times(SIGN_STAGE):
            mime = MIME.get(Path(name).suffix.lower(), "image/png")
            return sign(data, mime, name, policy.c2pa, input_sha256)

    return signed


def save(result: EditResult, out: str | Path, policy: OutputPolicy, times: StageTimes) -> list[Path]:
    """flow.save_images, signing a C2PA manifest into each file when the policy has credentials (else one line
    on stderr says how to add one, not under --quiet)."""
    signed = signer(policy, result, times)
    if signed is None:
        paths = flow.save_images(result, out)
        note(NO_CERT_LINE)
        return paths
    return flow.save_images(result, out, finish=lambda data, path: signed(data, path.name))
