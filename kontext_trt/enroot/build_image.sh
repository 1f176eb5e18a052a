#!/usr/bin/env bash
# Builds the kontext-trt enroot image with enroot alone (no Docker): import the NGC base image, create a
# container from it, install this repository into the container root, export it as a new squashfs.
#
#   enroot/build_image.sh [--dry-run] [--tag TAG] [--out-dir DIR]
#
# Writes DIR/kontext-trt-TAG.sqsh (DIR defaults to the current directory); the imported base image is kept
# next to it as DIR/nvidia+pytorch+TAG.sqsh and reused by the next run. Run it on a node with enroot and
# network access; it needs no GPU. Put the .sqsh on a filesystem the compute nodes see.
# Registry credentials come from your ~/.config/enroot/.credentials (netrc format, see enroot's import
# docs), never from this repository. Why this base tag: see the comment in enroot/Dockerfile.
set -euo pipefail

USAGE="usage: build_image.sh [--dry-run] [--tag TAG] [--out-dir DIR]"
TAG=25.12-py3
case ${BASH_SOURCE[0]} in */*) HERE=${BASH_SOURCE[0]%/*} ;; *) HERE=. ;; esac
REPO=$(cd "$HERE/../.." && pwd)  # the repository root (this script is kontext_trt/enroot/build_image.sh)
SRC=/opt/kontext-trt

# shellcheck source=kontext_trt/enroot/common.sh
source "${BASH_SOURCE[0]%/*}/common.sh"

dry_run=0
tag=$TAG
out_dir=$PWD
while (($#)); do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --tag) need $# "$1"; tag=$2; shift 2 ;;
    --out-dir) need $# "$1"; out_dir=$2; shift 2 ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) die "unknown argument '$1'; $USAGE" ;;
  esac
done

base="$out_dir/nvidia+pytorch+$tag.sqsh"
image="$out_dir/kontext-trt-$tag.sqsh"
name="kontext-trt-build-$tag"

[[ -f $base ]] || run enroot import --output "$base" "docker://nvcr.io#nvidia/pytorch:$tag"
run enroot create --force --name "$name" "$base"
# NVIDIA_VISIBLE_DEVICES=void skips enroot's GPU hook, so the install also runs on nodes without a driver.
run enroot start --root --rw --env NVIDIA_VISIBLE_DEVICES=void --mount "$REPO:$SRC" "$name" \
  bash "$SRC/kontext_trt/enroot/install_in_image.sh" "$SRC"
run enroot export --force --output "$image" "$name"
run enroot remove --force "$name"
