#!/usr/bin/env bash
# The benchmark protocol on the GPU machine in two calls of under ten minutes each, chained
# with no pause so one lease holds both (docs/benchmarks.md):
#
#   benchmarks/protocol.sh prepare    llama.cpp built and its GGUF written (niced, in the
#                                     background) while the GPU tests run
#   benchmarks/protocol.sh measure    moe-llm bench, then llama-bench right after it
#
# Environment: OUT (results folder) [out], ROWS (moe-llm bench --rows) [the headline rows],
# BUDGETS (the budgets besides 12 GiB) [16GiB 4GiB 2GiB], NCMOE (the -ncmoe sweep) [0 7 26 32],
# TUNING [benchmarks/results/h200-kernel-tuning-halfblock.json]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
ROWS=${ROWS:-full,full-cpu-off,full-cpu-all,resident,full-16GiB,full-cpu-off-16GiB,full-cpu-all-16GiB,full-4GiB,full-cpu-all-4GiB,full-cpu-off-4GiB,full-cpu-all-2GiB,full-3bit,resident-3bit}
BUDGETS=${BUDGETS:-16GiB 4GiB 2GiB}
extra=()
for b in $BUDGETS; do extra+=(--extra-budget "$b"); done
TUNING=${TUNING:-benchmarks/results/h200-kernel-tuning-halfblock.json}
GPU_TESTS=${GPU_TESTS:-tests/test_gpu_kernels.py tests/test_gpu_split.py tests/test_gpu_engine.py tests/test_batching_gpu.py}
case "${1:-}" in
  prepare)
    (nice -n 19 benchmarks/peers/llamacpp.sh build && nice -n 19 benchmarks/peers/llamacpp.sh gen) \
      > "$OUT/peer-build.log" 2>&1 &
    peer=$!
    # shellcheck disable=SC2086
    timeout "${GPU_TESTS_S:-200}" python -m pytest $GPU_TESTS -p no:cacheprovider -rfEX > "$OUT/gpu-tests.log" 2>&1 || true
    tail -n 25 "$OUT/gpu-tests.log"
    wait "$peer" || { tail -n 20 "$OUT/peer-build.log"; exit 1; }
    tail -n 3 "$OUT/peer-build.log"
    ;;
  measure)
    python -m moe_llm bench -v --repeats 2 --accelerate-layers 0 --kernel-tuning "$TUNING" --rows "$ROWS" "${extra[@]}" \
      --out "$OUT/h200-mixtral8x7b-2bit.json" > "$OUT/h200-mixtral8x7b-2bit.log" 2>&1 \
      || { tail -n 30 "$OUT/h200-mixtral8x7b-2bit.log"; exit 1; }
    grep -v "^20..-..-.. " "$OUT/h200-mixtral8x7b-2bit.log" | tail -n 40
    NCMOE=${NCMOE:-0 7 26 32} benchmarks/peers/llamacpp.sh bench
    benchmarks/peers/llamacpp.sh pack "$OUT/llamacpp-L32.tar.gz"
    ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
