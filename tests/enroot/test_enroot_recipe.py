"""The container recipe installs what pyproject's `trt` and `rtx` extras ask for, from the same pinned NGC tag."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENROOT = REPO / "kontext_trt" / "enroot"


def name_of(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def test_recipe_installs_pyprojects_trt_and_rtx_extras_around_the_images_tensorrt() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    install = (ENROOT / "install_in_image.sh").read_text()
    [recipe_extras] = re.findall(r"^EXTRAS=(\S+)$", install, re.MULTILINE)
    assert recipe_extras.split(",") == ["trt", "rtx"] and {"trt", "rtx"} <= set(extras)
    assert 'pip install --no-cache-dir --constraint "$PINS" "${src}[$EXTRAS]"' in install
    trt = {name_of(r) for r in extras["trt"] + extras["rtx"]}
    base = {name_of(r) for r in project["dependencies"]}
    [pinned] = re.findall(r"\^\(([a-z|]+)\)==", install)
    pins = set(pinned.split("|"))
    assert "tensorrt" in trt & pins, "the trt extra's tensorrt must come from the image, not PyPI"
    assert pins <= trt | base, f"the recipe pins packages pyproject does not ask for: {pins - trt - base}"


def test_dockerfile_and_enroot_build_share_the_install_script_and_base_tag() -> None:
    dockerfile = (ENROOT / "Dockerfile").read_text()
    build_image = (ENROOT / "build_image.sh").read_text()
    for recipe in (dockerfile, build_image):
        assert "enroot/install_in_image.sh" in recipe
        assert "pip install" not in recipe
    [docker_tag] = re.findall(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:(\S+)$", dockerfile, re.MULTILINE)
    [enroot_tag] = re.findall(r"^TAG=(\S+)$", build_image, re.MULTILINE)
    assert docker_tag == enroot_tag
    assert re.fullmatch(r"\d\d\.\d\d-py3", docker_tag), "pin an exact NGC release tag, not latest"
