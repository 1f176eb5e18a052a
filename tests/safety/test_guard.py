"""The blocking paths: a flagged input stops before any stage, a flagged output is not written (CLI exit 2, API
exception with the verdicts), and verdict, mark and input hash land in the PNG metadata."""
import json

import pytest
from PIL import Image

from kontext_trt.assemble import build_pipeline
from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, request
from kontext_trt.safety import guard
from kontext_trt.safety.checker import ContentFlagged, Verdict, load_checker


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "in.png"
    im.sample_image(96, 64).save(path)
    return path


def edit_argv(model, sample, out, *extra):
    return [str(a) for a in ("edit", "--model", model, "--image", sample, "--prompt", "add a moon", "--out", out,
                             "--steps", 1, "--no-auto-resize", "--dtype", "fp32", *extra)]


def test_flagged_input_refused_before_any_stage(tiny_ckpt, fake_checkers):
    k = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))
    policy = guard.OutputPolicy(load_checker(f"{fake_checkers}:FlagEverything"), "flag-everything")
    req = EditRequest(prompts=["x"], image=im.sample_image(96, 64), steps=1, auto_resize=False)
    with pytest.raises(ContentFlagged, match=r"input image flagged by the safety checker \(TEST_LABEL\)") as info:
        guard.edit(k, req, policy)
    assert info.value.verdicts[0].labels == {"TEST_LABEL": 0.9}
    assert list(k.times.seconds) == [guard.CHECK_STAGE]  # no encoder, transformer or decoder call


def test_flagged_output_raises_with_verdicts(tiny_ckpt, fake_checkers):
    k = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))
    policy = guard.OutputPolicy(load_checker(f"{fake_checkers}:FlagOutputs"), "flag-outputs")
    req = EditRequest(prompts=["a", "b"], image=im.sample_image(96, 64), steps=1, auto_resize=False)
    with pytest.raises(ContentFlagged, match="output flagged") as info:
        guard.edit(k, req, policy)
    assert [v.flagged for v in info.value.verdicts] == [True, True] and info.value.passed == [None, None]
    assert len(k.times.seconds["transformer"]) == 1 and len(k.times.seconds[guard.CHECK_STAGE]) == 2


@pytest.mark.parametrize("name", ["FlagEverything", "FlagOutputs"])
def test_cli_exit_2_and_no_file(capsys, tiny_ckpt, sample, tmp_path, fake_checkers, name):
    out = tmp_path / "out.png"
    code = main(edit_argv(tiny_ckpt, sample, out, "--safety-checker", f"{fake_checkers}:{name}"))
    _, err = capsys.readouterr()
    assert code == 2 and not out.exists()
    what = "input image" if name == "FlagEverything" else "output"
    assert err.startswith(f"error: {what} flagged by the safety checker (TEST_LABEL)") and err.count("\n") == 1


def test_passing_output_carries_verdict_mark_and_input_hash(capsys, tiny_ckpt, tmp_path):
    source = tmp_path / "big.png"
    im.sample_image(256, 256).save(source)
    out = tmp_path / "out.png"
    code = main(edit_argv(tiny_ckpt, source, out))
    stdout, err = capsys.readouterr()
    assert code == 0 and "note: no C2PA manifest: pass --c2pa-cert" in err
    meta = json.loads(Image.open(out).text["kontext-trt"])
    assert meta["safety"]["checker"] == "nudenet"
    assert meta["safety"]["input"] == {"checker": "nudenet", "flagged": False, "labels": {}}
    assert meta["safety"]["output"] == {"checker": "nudenet", "flagged": False, "labels": {}}
    assert meta["watermark"] == "dwtDct luma KTRT01"
    assert meta["input_sha256"] == guard.pixels_sha256(im.load_image(source))
    assert guard.CHECK_STAGE in stdout and guard.MARK_STAGE in stdout  # the stage table
    code = main(["verify", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "watermark: present (KTRT01, 100% of bits match)" in stdout and "c2pa: no manifest" in stdout


def test_safety_checker_none_warns_and_writes(capsys, tiny_ckpt, sample, tmp_path):
    out = tmp_path / "out.png"
    code = main(edit_argv(tiny_ckpt, sample, out, "--safety-checker", "none"))
    _, err = capsys.readouterr()
    assert code == 0 and out.exists() and err.count("License obliges you to filter or review outputs") == 1
    meta = json.loads(Image.open(out).text["kontext-trt"])
    assert meta["safety"] == {"checker": "none", "input": None, "outputs": None}
    assert meta["watermark"] is None  # 96x64 is under the mark's 256x256 minimum


class FlagSize:
    """Flags the images of one size: a stand-in for content that only one reference holds."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, images):
        return [Verdict({"TEST_LABEL": 0.8} if img.size == self.size else {}, "flag-size") for img in images]


def test_every_reference_is_checked_before_any_stage(klein_tiny_ckpt):
    k = build_pipeline(LoadSpec(klein_tiny_ckpt, dtype="fp32"))
    policy = guard.OutputPolicy(FlagSize((96, 64)), "flag-size")
    refs = [im.sample_image(64, 64), im.sample_image(96, 64), im.sample_image(64, 64)]  # the second is flagged
    with pytest.raises(ContentFlagged, match=r"input image flagged by the safety checker \(TEST_LABEL\)") as info:
        guard.edit(k, request(["x"], refs, steps=1), policy)
    assert info.value.verdicts[0].labels == {"TEST_LABEL": 0.8}
    assert list(k.times.seconds) == [guard.CHECK_STAGE]  # no encoder, transformer or decoder call
    verdicts = guard.input_verdicts(policy, [request(["x"], refs[:1]), request(["y"], refs[1:]), request(["z"])],
                                    k.times)
    assert verdicts == [Verdict({}, "flag-size"), Verdict({"TEST_LABEL": 0.8}, "flag-size"), None]
