#!/usr/bin/env bash
# Install dspark into the active Python (a venv if one is active).
#
#   bash scripts/install.sh          # dspark + a llama-cpp-python built for this machine
#   bash scripts/install.sh --test   # the same, plus the test extras (pytest, gguf, pexpect, openai)
#   DSPARK_PACK=DIR bash scripts/install.sh   # offline, from what scripts/pack_for_device.sh packed into DIR
#   bash scripts/install.sh --apply-patches DIR   # only apply dspark's llama.cpp patches to the llama.cpp tree DIR
#
# llama-cpp-python is compiled from source. The build flags are picked by platform:
#   - CUDA       when `nvcc` is on PATH and `nvidia-smi -L` lists a GPU, for that GPU's architecture only
#                (nvidia-smi's compute_cap; all architectures would take far longer to compile)
#   - Metal      on macOS
#   - CPU        otherwise: a portable build (GGML_NATIVE=OFF) with the SIMD extensions this CPU reports,
#                and never AMX (some VMs report AMX but fault on it inside ggml_backend_amx_mul_mat).
# Every default build has llama.cpp's RPC backend (-DGGML_RPC=ON).
# Set CMAKE_ARGS yourself to override all of that, e.g.  CMAKE_ARGS="-DGGML_VULKAN=on" bash scripts/install.sh
#
# The llama.cpp vendored in llama-cpp-python's sdist gets dspark's patches first (scripts/llama-cpp-patches/, in
# the order of its series file: batch-invariant verify kernels for F32, F16 and the common quantizations, an
# AVX-512 Q4_1 dot product, and llama.cpp's fast batch kernels kept to prompts; see README "Kernels").
# Every patch must apply exactly (no fuzz): one that does not stops the install, since a build without it would
# silently lack its kernels. DSPARK_LLAMA_PATCHES=0 builds stock llama.cpp instead: kept exact by leaving its fast
# batch kernels out (prompts cost up to twice as much), or with DSPARK_FAST_KERNELS=1 fast but not batch-invariant
# (greedy output may then differ from the target alone at near-ties).
#
# pip caches built wheels without regard to CMAKE_ARGS, so a wheel built with the wrong flags would survive a
# rebuild. We keep our own wheel cache keyed by (version, flags, python, platform) and bypass pip's.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
EXTRAS=""
PRINT_ONLY=0
PATCH_ONLY=""
while (( $# )); do
  case "$1" in
    --test) EXTRAS="[test]" ;;
    --print-cmake-args) PRINT_ONLY=1 ;;
    --apply-patches)
      if (( $# < 2 )) || [[ ! -d "$2" ]]; then echo "install.sh: --apply-patches takes a llama.cpp source folder" >&2; exit 2; fi
      PATCH_ONLY="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "install.sh: $*" >&2; }
t_start=$SECONDS
elapsed() { local s=$((SECONDS - ${1:-$t_start})); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
step() { log "[$1] $2 (at $(elapsed))"; }  # the step a user is waiting on, and the time so far
ticker=""
stop_ticker() { if [[ -n "$ticker" ]]; then kill "$ticker" 2>/dev/null || true; wait "$ticker" 2>/dev/null || true; ticker=""; fi; }
trap stop_ticker EXIT

# dspark's llama.cpp patches, in the order of their series file (none with DSPARK_LLAMA_PATCHES=0).
patches=()
if [[ "${DSPARK_LLAMA_PATCHES:-1}" != 0 ]]; then
  while read -r name; do
    [[ -n "$name" && "$name" != \#* ]] && patches+=("$here/scripts/llama-cpp-patches/$name")
  done < "$here/scripts/llama-cpp-patches/series"
fi

patch_error() {  # $1: what went wrong; $2: patch's own words on it (optional)
  log "error: $1"
  if [[ -n "${2:-}" ]]; then printf '%s\n' "$2" | sed 's/^/install.sh:   /' >&2; fi
  log "  dspark's kernels need every patch of scripts/llama-cpp-patches/series. To build stock llama.cpp instead,"
  log "  set DSPARK_LLAMA_PATCHES=0: it is then kept exact by leaving its fast batch kernels out (prompts cost up to"
  log "  twice as much), or with DSPARK_FAST_KERNELS=1 fast but inexact (greedy output may then differ from the"
  log "  target alone at near-ties)"
  exit 1
}

need_patch_command() {
  if (( ${#patches[@]} )) && ! command -v patch >/dev/null 2>&1; then
    patch_error "no \`patch\` command here to apply dspark's llama.cpp patches (install it: e.g. apt-get install patch)"
  fi
}

# Apply the patches to the llama.cpp tree $1, each exactly as written (no fuzz: a hunk whose context differs
# is an error, not a guess), in order; print each one's name on stdout once applied. The first that does not
# apply ends the script (exit 1), naming it and the hunks that failed.
apply_patches() {
  local dir="$1" p out
  need_patch_command
  for p in ${patches[@]+"${patches[@]}"}; do
    if ! out="$(patch -p1 --dry-run --fuzz=0 --forward --batch -d "$dir" < "$p" 2>&1)"; then
      patch_error "$(basename "$p") does not apply to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's llama.cpp ($dir)" "$out"
    fi
    patch -p1 -s --fuzz=0 --forward --batch -d "$dir" < "$p" >/dev/null
    basename "$p" .patch
    log "applied $(basename "$p")"
  done
}

if [[ -n "$PATCH_ONLY" ]]; then apply_patches "$PATCH_ONLY"; exit 0; fi

# The sdist itself, from the package index's JSON API (PEP 691) with its sha256 checked: `pip download` of an sdist
# first installs its build backend in an isolated environment and prepares its metadata, which took 3m21s of a
# 5m39s install here (the compile: 2m01s). pip download is the fallback (another index, no JSON API).
fetch_sdist() {  # $1: the folder to put llama_cpp_python-VERSION.tar.gz in
  local index="${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}"
  if "$PYTHON" - "$1" "$LLAMA_CPP_PYTHON_VERSION" "${index:-https://pypi.org/simple}" <<'PY' 2>/dev/null; then return 0; fi
import hashlib, json, os, sys, urllib.request
dest, version, index = sys.argv[1], sys.argv[2], sys.argv[3].rstrip("/")
name = f"llama_cpp_python-{version}.tar.gz"
req = urllib.request.Request(f"{index}/llama-cpp-python/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    entry = next(f for f in json.load(r)["files"] if f["filename"] == name)
url = urllib.request.urljoin(f"{index}/llama-cpp-python/", entry["url"])
digest, part = hashlib.sha256(), os.path.join(dest, name + ".part")
with urllib.request.urlopen(url, timeout=120) as r, open(part, "wb") as out:
    for block in iter(lambda: r.read(1 << 20), b""):
        digest.update(block)
        out.write(block)
if digest.hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"{name}: sha256 mismatch")
os.replace(part, os.path.join(dest, name))
PY
  rm -f "$1"/*.part
  log "  the index's JSON API did not serve it: downloading with pip (slower: it prepares the package's metadata)"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-cache-dir -d "$1" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
}

# dspark loads libllama and ggml's libraries, nothing else of llama-cpp-python's build. Two more things are
# compiled by default, about 40% of the time: llama.cpp's common library (llama-cpp-python's CMakeLists forces it
# on, with cpp-httplib; its Python bindings never load it) and the multimodal library (LLAVA_BUILD: tools/mtmd
# with miniaudio and stb; loaded only by multimodal chat handlers, which dspark does not use). They are left out
# (-DLLAVA_BUILD=OFF below; the common library by editing that one line of the unpacked source), unless
# DSPARK_FULL_BUILD=1. Part of the wheel cache's key.
TRIM="common-llava-off"
if [[ "${DSPARK_FULL_BUILD:-0}" == 1 ]]; then TRIM="full"; fi
trim_build() {  # $1: llama-cpp-python's unpacked source
  [[ "$TRIM" == full ]] && return 0
  "$PYTHON" - "$1/CMakeLists.txt" <<'PY' || log "note: llama.cpp's common library stays in the build (it only takes longer)"
import sys
path = sys.argv[1]
text = open(path).read()
forced = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
if forced not in text:
    sys.exit(1)
open(path, "w").write(text.replace(forced, forced.replace(" ON ", " OFF ")))
PY
}

cpu_flags() {
  # Map the CPU's reported features to ggml's CMake switches (Linux x86_64).
  # GGML_LLAMAFILE=OFF and GGML_CPU_REPACK=OFF make stock CPU kernels batch-invariant: a token's logits are
  # bit-identical whether it is decoded alone or inside a verify batch (llamafile's sgemm and the repacked
  # Q4 gemm only serve batches, and sum in another order than the one-token path). That is what makes
  # greedy speculative output identical to the target alone even at near-ties. When dspark's
  # prefill-fast-paths patch applies, both come back on (below): it keeps them to prompts. DSPARK_FAST_KERNELS=1
  # keeps them on regardless: exactness then holds only up to floating-point near-ties.
  local feats args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  if [[ "${DSPARK_FAST_KERNELS:-0}" != 1 ]]; then args+=" -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF"; fi
  feats=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  has() { [[ "$feats" == *" $1 "* ]]; }
  has avx && args+=" -DGGML_AVX=ON"
  has avx2 && args+=" -DGGML_AVX2=ON"
  has fma && args+=" -DGGML_FMA=ON"
  has f16c && args+=" -DGGML_F16C=ON"
  has bmi2 && args+=" -DGGML_BMI2=ON"
  has avx512f && args+=" -DGGML_AVX512=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"  # /proc/cpuinfo spells this one without "_"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
  echo "$args"
}

if [[ -z "${CMAKE_ARGS:-}" ]]; then
  if [[ "$(uname -s)" == "Darwin" ]]; then
    CMAKE_ARGS="-DGGML_METAL=on"
  elif command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .' || true)"
    CMAKE_ARGS="-DGGML_CUDA=on${arch:+ -DCMAKE_CUDA_ARCHITECTURES=$arch}"
  elif [[ "$(uname -m)" == "x86_64" && -r /proc/cpuinfo ]]; then
    CMAKE_ARGS="$(cpu_flags)"
  else
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
    if [[ "${DSPARK_FAST_KERNELS:-0}" != 1 ]]; then CMAKE_ARGS+=" -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF"; fi
  fi
  # llama.cpp's RPC backend, on every platform: `dspark rpc-server` serves this machine's devices and --rpc
  # spreads a target over such servers (the same libraries either way, no second build).
  CMAKE_ARGS+=" -DGGML_RPC=ON"
  if [[ "${DSPARK_FULL_BUILD:-0}" != 1 ]]; then CMAKE_ARGS+=" -DLLAVA_BUILD=OFF"; fi  # see trim_build
fi
export CMAKE_ARGS
if [[ "$PRINT_ONLY" == 1 ]]; then echo "$CMAKE_ARGS"; exit 0; fi
log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with CMAKE_ARGS=\"$CMAKE_ARGS\""

# Offline, from a pack: the patched source and every wheel come from DSPARK_PACK, nothing is downloaded.
pack="${DSPARK_PACK:-}"
pip_from=()
if [[ -n "$pack" ]]; then
  if [[ ! -d "$pack/llama-cpp-python" || ! -d "$pack/wheels" ]]; then
    echo "install.sh: DSPARK_PACK=$pack is not a pack (bash scripts/pack_for_device.sh makes one)" >&2; exit 2
  fi
  pip_from=(--no-index --find-links "$pack/wheels")
  log "offline: building from $pack"
fi

pyver="$("$PYTHON" -c 'import sys, platform; print(f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')"
sha256() { sha256sum 2>/dev/null || shasum -a 256; }
patch_sum=none
if (( ${#patches[@]} )); then patch_sum="$(cat "${patches[@]}" | sha256 | cut -c1-16)"; fi
key="$(printf '%s|%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$pyver" "$patch_sum" "$TRIM" | sha256)"
key="${key:0:16}"
cache="${DSPARK_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dspark/wheels}/$key"

installed="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
stamp="$("$PYTHON" -c 'import importlib.util as u, os; s=u.find_spec("llama_cpp"); p=os.path.join(os.path.dirname(s.origin), ".dspark-build-key") if s else ""; print(open(p).read().strip() if p and os.path.exists(p) else "")' 2>/dev/null || true)"

if [[ "$installed" == "$LLAMA_CPP_PYTHON_VERSION" && "$stamp" == "$key" ]]; then
  log "llama-cpp-python already installed with these flags"
else
  wheel="$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    log "building llama-cpp-python from source into $cache (once; the wheel is kept for every venv)"
    rm -rf "$cache.tmp" && mkdir -p "$cache.tmp/src"
    source_spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    build_flags=()
    if [[ -n "$pack" ]]; then
      # The pack's source has the patches applied already; build it without an isolated environment (that
      # would download the build backend), with scikit-build-core from the pack.
      cp -r "$pack/llama-cpp-python" "$cache.tmp/src/"
      source_spec="$cache.tmp/src/llama-cpp-python"
      trim_build "$source_spec"
      cp "$pack/applied-patches" "$cache.tmp/applied-patches"
      "$PYTHON" -m pip install -q "${pip_from[@]}" scikit-build-core
      build_flags=(--no-build-isolation "${pip_from[@]}")
    elif (( ${#patches[@]} )); then
      # The sdist, unpacked, with our patches applied to its vendored llama.cpp.
      need_patch_command
      step 1/4 "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's source"
      fetch_sdist "$cache.tmp/src"
      tar -xzf "$cache.tmp"/src/llama_cpp_python-*.tar.gz -C "$cache.tmp/src"
      source_spec="$(ls -d "$cache.tmp"/src/llama_cpp_python-*/ | head -n1)"
      step 2/4 "applying dspark's llama.cpp patches"
      apply_patches "$source_spec/vendor/llama.cpp" > "$cache.tmp/applied-patches"
      trim_build "$source_spec"
    fi
    # With dspark-prefill-fast-paths applied, llama.cpp's batch kernels serve only prompts (batches above 16
    # tokens) and repacked Q4_K decodes exactly, so they are built back in: stock prefill and decode speed, verify
    # batches still bit-identical. Without it they stay out, since they would break exactness.
    # (x86 only: elsewhere llama.cpp repacks other layouts whose gemm and gemv were not made to agree.)
    if [[ "$(uname -m)" == "x86_64" ]] && grep -qx dspark-prefill-fast-paths "$cache.tmp/applied-patches" 2>/dev/null; then
      CMAKE_ARGS="${CMAKE_ARGS/ -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF/}"
      export CMAKE_ARGS
      log "fast prompt paths patched in: building with llamafile sgemm and Q4_K repacking (CMAKE_ARGS=\"$CMAKE_ARGS\")"
    fi
    jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
    step 3/4 "compiling llama.cpp on $jobs cores (the long step: about 2 minutes on 2 cores)"
    t_build=$SECONDS
    ( trap 'exit 0' TERM; while sleep 30; do log "  still compiling llama.cpp: $(elapsed "$t_build") so far"; done ) &
    ticker=$!
    CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
      "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python ${build_flags[@]+"${build_flags[@]}"} \
      -w "$cache.tmp" "$source_spec"
    stop_ticker
    log "compiled llama.cpp in $(elapsed "$t_build")"
    rm -rf "$cache.tmp/src"
    touch "$cache.tmp/applied-patches"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    wheel="$(ls "$cache"/llama_cpp_python-*.whl | head -n1)"
  else
    log "using cached wheel $wheel"
  fi
  # Replace any llama-cpp-python built with other flags, then let pip add its dependencies.
  step 4/4 "installing llama-cpp-python"
  "$PYTHON" -m pip install --no-cache-dir --force-reinstall --no-deps "$wheel"
  "$PYTHON" -m pip install --no-cache-dir ${pip_from[@]+"${pip_from[@]}"} "$wheel"
  "$PYTHON" - "$key" "$cache/applied-patches" <<'PY'
import importlib.util, os, shutil, sys
pkg = os.path.dirname(importlib.util.find_spec("llama_cpp").origin)
with open(os.path.join(pkg, ".dspark-build-key"), "w") as f:
    f.write(sys.argv[1])
# Which of dspark's llama.cpp patches this build carries, for `dspark doctor` (empty: none).
if os.path.exists(sys.argv[2]):
    shutil.copyfile(sys.argv[2], os.path.join(pkg, ".dspark-patches"))
PY
fi

log "installing dspark$EXTRAS (at $(elapsed))"
"$PYTHON" -m pip install ${pip_from[@]+"${pip_from[@]}"} -e "$here$EXTRAS"
log "done in $(elapsed): run  dspark --help"
