#!/usr/bin/env bash
# Build llama.cpp's own `llama-speculative-simple` and `llama-cli`-free tools from the llama.cpp vendored in the
# llama-cpp-python sdist we use, so the benchmark compares dspark with the very same llama.cpp.
#   bash scripts/build_llama_speculative.sh [OUT_DIR]          -> OUT_DIR/build/bin/llama-speculative-simple
#   bash scripts/build_llama_speculative.sh --libs [OUT_DIR]   -> only the libraries (libllama, libggml*), for
#       LLAMA_CPP_LIB_PATH=OUT_DIR/build/bin: stock llama.cpp under dspark (tests/test_exactness.py compares)
# It prints the folder holding them (stdout); the build's own output goes to stderr.
set -euo pipefail
libs_only=""
if [[ "${1:-}" == "--libs" ]]; then libs_only=1; shift; fi
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dspark/llama.cpp-$version}"
if [[ -x "$out/build/bin/llama-speculative-simple" ]]; then echo "$out/build/bin"; exit 0; fi
if [[ -n "$libs_only" && -e "$out/build/bin/.complete" ]]; then echo "$out/build/bin"; exit 0; fi
mkdir -p "$out"
# One build at a time in a folder (two test sessions, say): the second waits, then finds it done.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$out/.lock"
  flock 9
  if [[ -x "$out/build/bin/llama-speculative-simple" ]]; then echo "$out/build/bin"; exit 0; fi
  if [[ -n "$libs_only" && -e "$out/build/bin/.complete" ]]; then echo "$out/build/bin"; exit 0; fi
fi
if [[ ! -d "$out/src" ]]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --no-deps --no-binary :all: -q -d "$tmp" "llama-cpp-python==$version" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$out/src"
  rm -rf "$tmp"
fi
# Same portable CPU flags as scripts/install.sh (no AMX), unless CMAKE_ARGS says otherwise, but with
# llama.cpp's own fast batch kernels (llamafile sgemm, repack) left on: the comparison gives llama.cpp its
# fastest default build, not dspark's batch-invariant one.
args="${CMAKE_ARGS:-$(DSPARK_FAST_KERNELS=1 bash "$(dirname "$0")/install.sh" --print-cmake-args)}"
cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF $args >&2
targets=(llama-speculative-simple llama-bench)
if [[ -n "$libs_only" ]]; then targets=(llama); fi
cmake --build "$out/build" -j "$(getconf _NPROCESSORS_ONLN)" --target "${targets[@]}" >&2
touch "$out/build/bin/.complete"  # a build cut off halfway is not taken for a finished one
echo "$out/build/bin"
