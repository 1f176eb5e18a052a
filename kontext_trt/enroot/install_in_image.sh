#!/usr/bin/env bash
# Installs kontext-trt with its `trt` extra into the NGC PyTorch image. Runs as root inside the image:
# enroot/Dockerfile and enroot/build_image.sh both call it, so the two recipes install the same thing.
#
#   install_in_image.sh [--dry-run] SRC      SRC: the repository root as seen inside the image
#
# The requirements come from pyproject.toml itself (`pip install SRC[trt,rtx]`). The torch and tensorrt the
# image already ships are turned into pip constraints first, so pip resolves our other dependencies around
# NVIDIA's tested builds and never replaces them with PyPI wheels (the image also has its own
# /etc/pip/constraint.txt since NGC 25.03, which pip reads through PIP_CONSTRAINT where the image sets it).
set -euo pipefail

USAGE="usage: install_in_image.sh [--dry-run] SRC"
# trt: the datacenter SKUs' TensorRT (from the image); rtx: TensorRT-RTX for the fleet's RTX SKUs (ahead of time).
EXTRAS=trt,rtx
PINS=/tmp/kontext-trt-image-pins.txt
PIN_CMD="python -m pip list --format=freeze | grep -iE '^(torch|tensorrt)==' > $PINS"

# shellcheck source=kontext_trt/enroot/common.sh
source "${BASH_SOURCE[0]%/*}/common.sh"

# Write the image's torch/tensorrt versions as pip constraints; refuse to go on without a pip-visible tensorrt.
pin_image_packages() {
  if ((dry_run)); then
    echo "$PIN_CMD"
    return
  fi
  bash -o pipefail -c "$PIN_CMD" || true
  grep -qi '^tensorrt==' "$PINS" ||
    die "the base image has no pip-visible tensorrt; refusing to pull one from PyPI over the image's TensorRT"
}

dry_run=0
src=""
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    -h | --help)
      echo "$USAGE"
      exit 0
      ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z $src ]] || die "one SRC only"; src=$1 ;;
  esac
  shift
done
[[ -n $src ]] || die "$USAGE"

pin_image_packages
run python -m pip install --no-cache-dir --constraint "$PINS" "${src}[$EXTRAS]"
# NudeNet, the default safety checker, without its CPU onnxruntime and opencv (see safety/no-deps.txt).
run python -m pip install --no-cache-dir --no-deps -r "${src}/kontext_trt/safety/no-deps.txt"
# Mount points for enroot/start.sh (/model, /engines) and enroot/build_engines.sbatch (/onnx, /engines).
run mkdir -p /model /onnx /engines
run python -c 'from importlib.metadata import version as v; print("kontext-trt image:", *(f"{p} {v(p)}" for p in ("kontext-trt", "torch", "tensorrt")))'
