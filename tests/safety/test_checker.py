"""Safety checkers: NudeNet passes a benign image; --safety-checker specs load, warn or fail in one line."""
import pytest

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.safety import checker as ck


def test_nudenet_passes_a_benign_drawn_image():
    nudenet = ck.NudeNetChecker()
    verdicts = nudenet([im.sample_image(512, 384), im.sample_image(96, 64, seed=3)])
    assert [v.flagged for v in verdicts] == [False, False] and verdicts[0].checker == "nudenet"
    assert set(nudenet.labels) <= set(nudenet.classes) and len(nudenet.classes) == 18


def test_nudenet_threshold_decides():
    # Threshold 0 blocks on every listed label: the scores come back, one per label.
    verdict = ck.NudeNetChecker(threshold=0.0)([im.sample_image(320, 320)])[0]
    assert set(verdict.labels) == set(ck.NUDENET_LABELS) and all(0 <= s < 0.5 for s in verdict.labels.values())


def test_unknown_nudenet_label():
    with pytest.raises(KontextError, match="no label NOT_A_LABEL"):
        ck.NudeNetChecker(labels=["NOT_A_LABEL"])


def test_none_warns_about_the_license(capsys, cli_logging):
    assert ck.load_checker("none") is None
    err = capsys.readouterr().err
    assert "License obliges you to filter or review outputs" in err and err.count("\n") == 1
    assert err.startswith("WARNING kontext_trt.safety.checker: no safety checker:")


def test_module_callable(fake_checkers):
    checker = ck.load_checker(f"{fake_checkers}:FlagEverything")
    assert ck.run_checker(checker, [im.sample_image(64, 64)])[0].labels == {"TEST_LABEL": 0.9}


@pytest.mark.parametrize("spec,message", [
    ("nudenet2", "use nudenet, none or module:callable"),
    ("no_such_module_xyz:check", "cannot load it"),
    ("kontext_trt.safety.checker:NUDENET_THRESHOLD", "not callable"),
])
def test_bad_specs(spec, message):
    with pytest.raises(KontextError, match=message):
        ck.load_checker(spec)


def test_checker_contract_is_enforced():
    with pytest.raises(KontextError, match="one kontext_trt.safety.checker.Verdict per image"):
        ck.run_checker(lambda images: [True], [im.sample_image(64, 64)])
