#!/usr/bin/env bash
# Fetch the llama.cpp source for the peer benchmark and write it as a small, trimmed tarball.
#
# The source is the llama.cpp tree that the llama-cpp-python sdist vendors under vendor/llama.cpp
# (the GPU machine has no network, so the tarball travels with the working tree as a `carry`).
# Everything llama-bench does not need is dropped: models/, docs/, media/, tests/, benches/, pocs/,
# tools/ui/ and every ggml backend but ggml-cuda and ggml-cpu. About 5 MB.
#
#   benchmarks/peers/fetch_source.sh            # writes .peer/llama.cpp.tar.xz
#
# Environment:
#   LCPP_PY_VERSION  llama-cpp-python version whose sdist is used (default 0.3.36)
#   LCPP_SDIST       an sdist already downloaded (skips pip download)
#   LCPP_TAR         the tarball to write (default <repo>/.peer/llama.cpp.tar.xz)
set -euo pipefail

say() { echo "[fetch-source] $*" >&2; }
die() { echo "[fetch-source] error: $*" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=${LCPP_PY_VERSION:-0.3.36}
DEST=${LCPP_TAR:-$ROOT/.peer/llama.cpp.tar.xz}
KEEP_BACKENDS="ggml-cuda ggml-cpu"
DROP_DIRS="models docs media tests benches pocs tools/ui"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [[ -n "${LCPP_SDIST:-}" ]]; then
  [[ -f "$LCPP_SDIST" ]] || die "LCPP_SDIST=$LCPP_SDIST does not exist"
  SDIST=$LCPP_SDIST
else
  say "downloading the llama-cpp-python==$VERSION sdist"
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP/sdist" \
    || die "pip download of llama-cpp-python==$VERSION failed"
  SDIST=$(ls "$TMP"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)
  [[ -n "$SDIST" ]] || die "pip saved no llama_cpp_python-*.tar.gz"
fi

say "unpacking $(basename "$SDIST")"
tar xzf "$SDIST" -C "$TMP"
TOP=$(ls -d "$TMP"/llama_cpp_python-*/ | head -1)
SRC=${TOP}vendor/llama.cpp
[[ -f "$SRC/CMakeLists.txt" && -d "$SRC/tools/llama-bench" && -d "$SRC/gguf-py" ]] \
  || die "$SRC is not a llama.cpp tree with tools/llama-bench and gguf-py"

# The sdist carries the submodule's git directory, so the exact llama.cpp commit is known here.
# It is written into the tree (PEER_SOURCE) because the build cannot ask git for it: the tarball
# has no .git, and git run inside the project checkout would report the project's commit instead.
COMMIT=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
COMMIT_DATE=$(git -C "$SRC" log -1 --format=%cI 2>/dev/null || echo unknown)
say "llama.cpp commit $COMMIT ($COMMIT_DATE)"

say "trimming: $DROP_DIRS, and ggml backends other than $KEEP_BACKENDS"
for d in $DROP_DIRS; do rm -rf "${SRC:?}/$d"; done
for d in "$SRC"/ggml/src/ggml-*/; do
  name=$(basename "$d")
  [[ " $KEEP_BACKENDS " == *" $name "* ]] || rm -rf "$d"
done
rm -rf "$SRC/.git" "$SRC/.github" "$SRC/.devops"

cat > "$SRC/PEER_SOURCE" <<INFO
source=llama-cpp-python==$VERSION sdist, vendor/llama.cpp
commit=$COMMIT
commit_short=${COMMIT:0:7}
commit_date=$COMMIT_DATE
trimmed=$DROP_DIRS ggml/src/ggml-*(except $KEEP_BACKENDS) .git .github .devops
INFO

mkdir -p "$(dirname "$DEST")"
mv "$SRC" "$TMP/llama.cpp"
say "writing $DEST"
tar -C "$TMP" -cJf "$DEST.tmp" llama.cpp
mv "$DEST.tmp" "$DEST"
say "done: $(du -h "$DEST" | cut -f1) $(sha256sum "$DEST" | cut -c1-16)… $DEST"
