#!/usr/bin/env bash
# The README's GPU rows in one run (ViT-B/32, about 12 minutes on one H200): the CUDA checks, image and
# text encoding E2/CLIP at batch 32 eager and compiled and at batch 256 under AMP, the training step
# E2/CLIP-FT under AMP, and catalog embedding against the forward pass (full and --fast-decode). Each
# log goes to $OUT (default gpu-rows/); a step that fails or runs past its limit is reported and the
# next one runs.
#
#     bash benchmarks/gpu_rows.sh            # extra arguments go to every benchmark, e.g. --model ViT-B-16
set -u
out=${OUT:-gpu-rows}
mkdir -p "$out"
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" python "$@" > "$out/$name.log" 2>&1
    echo "   exit $? (log: $out/$name.log)"
    grep -v -E "^(W[0-9]{4}|WARNING)" "$out/$name.log" | tail -n 12
}
step gpu_check 240 benchmarks/gpu_check.py
step encode_b32_amp 120 benchmarks/encode_throughput.py --batch-size 32 --precision amp "$@"
step encode_b32_amp_compile 240 benchmarks/encode_throughput.py --batch-size 32 --precision amp --compile "$@"
step encode_b256_amp 120 benchmarks/encode_throughput.py --batch-size 256 --precision amp "$@"
step train_b64_amp 180 benchmarks/train_step.py --batch-size 64 --precision amp "$@"
step embed_b256 180 benchmarks/embed_throughput.py --batch-sizes 256 --images 2048 --workers 8 "$@"
step embed_b256_fast 180 benchmarks/embed_throughput.py --batch-sizes 256 --images 2048 --workers 8 --fast-decode "$@"
