#!/usr/bin/env bash
# How the JSONs in this folder were made (README: "Quality on the trained shapes model"): every setting's 200 held-out
# edits at the default 28 steps, scored by `kontext-trt eval`, and compared with the torch fp32 outputs of the same
# seeds. Usage: measure.sh WORK_DIR [N]  (WORK_DIR: scratch space for the checkpoint, exports, calibrations, images)
set -euo pipefail
WORK=${1:?usage: measure.sh WORK_DIR [N]}
N=${2:-200}  # the README tables: N=100
OUT=$(cd "$(dirname "$0")" && pwd)
K="kontext-trt"
M=$WORK/shapes
I=$WORK/images
mkdir -p "$WORK" "$I"
[ -d "$M" ] || $K synth "$M" --preset shapes
ev() { local name=$1; shift; echo "== $name"; $K eval --n "$N" --json "$OUT/$name.json" "$@"; }

# the full-precision reference and bf16
ev torch-fp32 --model "$M" --dtype fp32 --images "$I/fp32"
ev torch-bf16 --model "$M" --dtype bf16 --reference "$I/fp32"
# ONNX Runtime over an fp32 export
[ -f "$WORK/onnx/manifest.json" ] || $K export --model "$M" --out "$WORK/onnx" --dtype fp32
ev ort-fp32 --backend onnxruntime --onnx "$WORK/onnx" --reference "$I/fp32"
# calibration set: 32 training-range edits (never the held-out scenes)
[ -d "$WORK/calib" ] || $K eval --write-calib "$WORK/calib" --n 32
Q=(--calib "$WORK/calib" --calib-size 32 --calib-steps 28 --report-size 1 --no-auto-resize --dtype fp32)
# FP8 Q/DQ ONNX on ONNX Runtime (weights and inputs of every quantized linear in E4M3, attention bf16 -> fp32 here)
[ -f "$WORK/q-fp8/transformer/model.onnx" ] || $K quantize --model "$M" --precision fp8 --out "$WORK/q-fp8" "${Q[@]}"
[ -d "$WORK/q-fp8/vae_decoder" ] || $K export --model "$M" --out "$WORK/q-fp8" --stages clip,t5,vae_encoder,vae_decoder \
    --dtype fp32
ev ort-fp8 --backend onnxruntime --onnx "$WORK/q-fp8" --reference "$I/fp32"
ev torch-fp8-emulated --model "$M" --dtype fp32 --quantized "$WORK/q-fp8" --reference "$I/fp32"
# NVFP4, SVDQuant rank 32 (the default) and plain, as the bit-exact torch emulation (the Q/DQ ONNX needs Blackwell)
[ -d "$WORK/q-fp4/quant" ] || $K quantize --model "$M" --precision nvfp4 --out "$WORK/q-fp4" "${Q[@]}"
ev torch-nvfp4-emulated --model "$M" --dtype fp32 --quantized "$WORK/q-fp4" --reference "$I/fp32"
[ -d "$WORK/q-fp4-r0/quant" ] || $K quantize --model "$M" --precision nvfp4 --svd-rank 0 --out "$WORK/q-fp4-r0" "${Q[@]}"
ev torch-nvfp4-r0-emulated --model "$M" --dtype fp32 --quantized "$WORK/q-fp4-r0" --reference "$I/fp32"
# step caching on the fp32 torch loop, against its uncached outputs
for c in fbcache:0.05 fbcache:0.12 teacache:0.25 teacache:0.4 teacache:0.6; do
    ev "torch-fp32-${c/:/-}" --model "$M" --dtype fp32 --cache "$c" --reference "$I/fp32"
done
