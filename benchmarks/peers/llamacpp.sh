#!/usr/bin/env bash
# The peer benchmark: llama.cpp with `--n-cpu-moe` on the synthetic Mixtral-8x7B geometry, run on the
# GPU machine right after `moe-llm bench`. docs/peer.md explains the comparison and the fit rule.
#
#   benchmarks/peers/llamacpp.sh build                 llama-bench (CUDA, sm_90) from the source tarball
#   benchmarks/peers/llamacpp.sh gen   [--layers N]    the GGUF: Q2_K experts, Q4_K attention, Q6_K output
#   benchmarks/peers/llamacpp.sh bench [--layers N] [--ncmoe "0 7 32"] [--out DIR]
#   benchmarks/peers/llamacpp.sh all   [--layers N] [--ncmoe "..."] [--out DIR] [--pack FILE]
#   benchmarks/peers/llamacpp.sh pack  FILE.tar.gz     the output folder as one file (for $OUT)
#
# Environment (flags win over it):
#   LCPP_TAR    the trimmed llama.cpp source (benchmarks/peers/fetch_source.sh)  [.peer/llama.cpp.tar.xz]
#   PEER_WORK   work folder: unpacked source, build, GGUF (git-ignored)          [.peer/work]
#   PEER_OUT    output folder: ncmoeN.json, ncmoeN.log, machine/source/commands   [.peer/out/L<layers>]
#   PEER_GGUF   the GGUF                                    [$PEER_WORK/synth-mixtral-8x7b-L<layers>.gguf]
#   LAYERS      decoder layers (2 for a smoke run)                                [32]
#   NCMOE       the -ncmoe values swept; 6/7 bracket 12 GiB, 26 ~ fewest fitting 4 GiB  [0 6 7 8 12 26 32]
#   THREADS     llama-bench -t                                                     [$(nproc)]
#   PROMPTS, GEN, REPS   llama-bench -p, -n, -r                                    [512,1024 / 128 / 3]
#   JOBS        build parallelism                                                  [$(nproc)]
#   PYTHON      python with numpy and pyyaml, for gen                              [python3]
#   FORCE=1     rebuild / regenerate even if a matching result is already there
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/benchmarks/peers"
T0=$SECONDS

say() { printf '[peer %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[peer] error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" > /dev/null 2>&1 || die "$1 is not installed (needed for '$CMD')"; }
usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[[ $# -ge 1 ]] || usage
CMD=$1; shift
PACK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) LAYERS=${2:?--layers needs a number}; shift 2 ;;
    --ncmoe) NCMOE=${2:?--ncmoe needs a list}; shift 2 ;;
    --out) PEER_OUT=${2:?--out needs a folder}; shift 2 ;;
    --pack) PACK=${2:?--pack needs a file}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) if [[ $CMD == pack && -z $PACK ]]; then PACK=$1; shift; else die "unknown argument '$1' (see --help)"; fi ;;
  esac
done

LAYERS=${LAYERS:-32}
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "--layers must be a positive integer, got '$LAYERS'"
LCPP_TAR=${LCPP_TAR:-$ROOT/.peer/llama.cpp.tar.xz}
PEER_WORK=${PEER_WORK:-$ROOT/.peer/work}
PEER_OUT=${PEER_OUT:-$ROOT/.peer/out/L$LAYERS}
PEER_GGUF=${PEER_GGUF:-$PEER_WORK/synth-mixtral-8x7b-L$LAYERS.gguf}
NCMOE=${NCMOE:-0 6 7 8 12 26 32}
THREADS=${THREADS:-$(nproc)}
PROMPTS=${PROMPTS:-512,1024}
GEN=${GEN:-128}
REPS=${REPS:-3}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
SRC=$PEER_WORK/llama.cpp
BIN=$SRC/build/bin/llama-bench

# Unpack the source once per tarball: a stamp holds the tarball's hash, and a new tarball replaces the tree.
unpack() {
  [[ -f $LCPP_TAR ]] || die "no llama.cpp source at $LCPP_TAR: run benchmarks/peers/fetch_source.sh here and carry .peer/llama.cpp.tar.xz"
  need tar; need sha256sum
  local sum; sum=$(sha256sum "$LCPP_TAR" | cut -d' ' -f1)
  if [[ -f $SRC/.tarball && $(cat "$SRC/.tarball") == "$sum" ]]; then return; fi
  say "unpacking $LCPP_TAR into $SRC"
  rm -rf "$SRC"; mkdir -p "$PEER_WORK"
  tar xJf "$LCPP_TAR" -C "$PEER_WORK" || die "could not unpack $LCPP_TAR"
  [[ -f $SRC/CMakeLists.txt && -d $SRC/tools/llama-bench ]] || die "$LCPP_TAR holds no llama.cpp/ tree with tools/llama-bench"
  echo "$sum" > "$SRC/.tarball"
}

source_field() { sed -n "s/^$1=//p" "$SRC/PEER_SOURCE" 2>/dev/null | head -1; }

build() {
  unpack
  if [[ -x $BIN && -f $SRC/build/.built && ${FORCE:-0} != 1 ]]; then
    say "llama-bench already built at $BIN (FORCE=1 rebuilds)"; return
  fi
  need cmake; need ninja
  if ! command -v nvcc > /dev/null 2>&1; then
    [[ -x /usr/local/cuda/bin/nvcc ]] || die "nvcc not found: the CUDA build needs the CUDA toolkit"
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  rm -rf "$SRC/build"
  # The commit comes from PEER_SOURCE, not git: inside the project checkout git would report ours.
  local commit; commit=$(source_field commit_short); commit=${commit:-unknown}
  say "configuring llama.cpp $commit (CUDA arch 90, log: $SRC/build/cmake.log)"
  mkdir -p "$SRC/build"
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0 \
    > "$SRC/build/cmake.log" 2>&1 || { tail -30 "$SRC/build/cmake.log"; die "cmake configure failed (log above)"; }
  say "building llama-bench with $JOBS jobs (about 4 minutes on 16 cores; log: $SRC/build/build.log)"
  local t=$SECONDS
  cmake --build "$SRC/build" --target llama-bench -j "$JOBS" > "$SRC/build/build.log" 2>&1 \
    || { grep -E 'error|Error' "$SRC/build/build.log" | head -20; tail -20 "$SRC/build/build.log"; die "build failed (log above)"; }
  [[ -x $BIN ]] || die "the build finished but $BIN is missing"
  touch "$SRC/build/.built"
  say "built $BIN in $((SECONDS - t)) s"
}

gen() {
  unpack
  need "$PYTHON"
  if [[ -f $PEER_GGUF && -f $PEER_GGUF.ok && ${FORCE:-0} != 1 ]]; then
    say "GGUF already written: $PEER_GGUF (FORCE=1 rewrites)"; return
  fi
  "$PYTHON" -c 'import numpy, yaml' 2> /dev/null || die "$PYTHON lacks numpy or pyyaml (gguf-py needs both)"
  local need_gb=$(( LAYERS * 49 / 100 + 1 ))  # 0.48 GB a layer, plus embeddings and output
  mkdir -p "$(dirname "$PEER_GGUF")"
  local free_gb; free_gb=$(df -P -BG "$(dirname "$PEER_GGUF")" 2> /dev/null | awk 'NR==2 {sub("G", "", $4); print $4}')
  if [[ $free_gb =~ ^[0-9]+$ ]] && (( free_gb <= need_gb )); then
    die "$(dirname "$PEER_GGUF") has ${free_gb} GB free, the GGUF needs about ${need_gb} GB"
  fi
  rm -f "$PEER_GGUF.ok"
  say "writing the $LAYERS-layer GGUF (about ${need_gb} GB): $PEER_GGUF"
  "$PYTHON" "$HERE/synth_gguf.py" "$PEER_GGUF" --layers "$LAYERS" --gguf-py "$SRC/gguf-py" || die "synth_gguf.py failed"
  echo "$LAYERS" > "$PEER_GGUF.ok"
}

# One line per configuration: the GPU buffers from the -v log, then the speeds.
summarize() {
  local n=$1
  grep -E ' CUDA0 (model|KV|compute) buffer size' "$PEER_OUT/ncmoe$n.log" | sed 's/^[^:]*: */    /' | sort | uniq -c | sed 's/^/ /' || true
  "$PYTHON" - "$PEER_OUT/ncmoe$n.json" <<'PY' || true
import json, sys
for r in json.load(open(sys.argv[1])):
    kind = f"tg{r['n_gen']}" if r["n_prompt"] == 0 else f"pp{r['n_prompt']}"
    print(f"    {kind:>7}: {r['avg_ts']:9.2f} ± {r['stddev_ts']:.2f} tok/s  samples {[round(x, 2) for x in r['samples_ts']]}")
PY
}

bench() {
  [[ -x $BIN ]] || die "no llama-bench at $BIN: run '$0 build' first"
  [[ -f $PEER_GGUF && -f $PEER_GGUF.ok ]] || die "no GGUF at $PEER_GGUF: run '$0 gen --layers $LAYERS' first"
  need "$PYTHON"
  [[ -n ${NCMOE// /} ]] || die "NCMOE is empty"
  for n in $NCMOE; do [[ $n =~ ^[0-9]+$ ]] || die "NCMOE must hold non-negative integers, got '$n'"; done
  mkdir -p "$PEER_OUT"
  # only the configurations of this run: a sweep cut short can be finished by a second run
  for n in $NCMOE; do rm -f "$PEER_OUT/ncmoe$n.json" "$PEER_OUT/ncmoe$n.log"; done
  { echo "date: $(date -u +%FT%TZ)"; echo "nproc: $(nproc)"; lscpu 2>/dev/null | grep -E 'Model name|Thread|Core|Socket|NUMA' || true
    free -g | head -2; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  } > "$PEER_OUT/machine.txt"
  cp "$SRC/PEER_SOURCE" "$PEER_OUT/source.txt" 2>/dev/null || echo "source: unknown" > "$PEER_OUT/source.txt"
  : > "$PEER_OUT/commands.txt"
  say "sweeping -ncmoe $NCMOE on $(basename "$PEER_GGUF"), $THREADS threads -> $PEER_OUT"
  for n in $NCMOE; do
    local args=(-m "$PEER_GGUF" -ngl 99 -ncmoe "$n" -fa 1 -t "$THREADS" -p "$PROMPTS" -n "$GEN" -r "$REPS" -o json -v)
    echo "llama-bench ${args[*]}" >> "$PEER_OUT/commands.txt"
    say "-ncmoe $n"
    local t=$SECONDS
    if ! "$BIN" "${args[@]}" > "$PEER_OUT/ncmoe$n.json" 2> "$PEER_OUT/ncmoe$n.log"; then
      tail -25 "$PEER_OUT/ncmoe$n.log"
      die "llama-bench failed at -ncmoe $n (log above; full log $PEER_OUT/ncmoe$n.log)"
    fi
    say "-ncmoe $n done in $((SECONDS - t)) s"
    summarize "$n"
  done
  say "done: $PEER_OUT (merge with: moe-llm peer merge OUR.json $PEER_OUT)"
}

pack() {
  [[ -n $PACK ]] || die "pack needs a file name: $0 pack FILE.tar.gz"
  compgen -G "$PEER_OUT/ncmoe*.json" > /dev/null || die "nothing to pack: no ncmoe*.json in $PEER_OUT"
  mkdir -p "$(dirname "$PACK")"
  tar -C "$(dirname "$PEER_OUT")" -czf "$PACK" "$(basename "$PEER_OUT")"
  say "packed $PEER_OUT into $PACK ($(du -h "$PACK" | cut -f1))"
}

case "$CMD" in
  build) build ;;
  gen) gen ;;
  bench) bench ;;
  pack) pack ;;
  all) build; gen; bench; if [[ -n $PACK ]]; then pack; fi ;;
  -h|--help|help) usage 0 ;;
  *) die "unknown command '$CMD': build, gen, bench, all or pack (see --help)" ;;
esac
