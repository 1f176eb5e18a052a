#!/usr/bin/env bash
# Starts the kontext-trt enroot image with the model folder and the engine cache mounted, and runs COMMAND.
#
#   enroot/start.sh [--dry-run] [--image SQSH] [--model DIR] [--engines DIR] [--] COMMAND [ARG...]
#
# Host paths default to $KONTEXT_IMAGE, $KONTEXT_MODEL and $KONTEXT_ENGINES. Inside the container the model
# is /model (read-only) and the cache /engines, and KONTEXT_MODEL / KONTEXT_ENGINES point there, e.g.
#   enroot/start.sh --model ~/flux-kontext --engines /shared/engines -- kontext-trt build --onnx /model/onnx --out /engines
set -euo pipefail

USAGE="usage: start.sh [--dry-run] [--image SQSH] [--model DIR] [--engines DIR] [--] COMMAND [ARG...]"

# shellcheck source=kontext_trt/enroot/common.sh
source "${BASH_SOURCE[0]%/*}/common.sh"

dry_run=0
image=${KONTEXT_IMAGE-}
model=${KONTEXT_MODEL-}
engines=${KONTEXT_ENGINES-}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --image) need $# "$1"; image=$2; shift 2 ;;
    --model) need $# "$1"; model=$2; shift 2 ;;
    --engines) need $# "$1"; engines=$2; shift 2 ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1'; $USAGE" ;;
    *) break ;;
  esac
done
[[ -n $image ]] || die "no image: give --image or set KONTEXT_IMAGE"
[[ -n $model ]] || die "no model folder: give --model or set KONTEXT_MODEL"
[[ -n $engines ]] || die "no engine cache: give --engines or set KONTEXT_ENGINES"
(($#)) || die "no command; $USAGE"

run enroot start \
  --mount "$model:/model:none:bind,ro" \
  --mount "$engines:/engines" \
  --env KONTEXT_MODEL=/model \
  --env KONTEXT_ENGINES=/engines \
  "$image" "$@"
