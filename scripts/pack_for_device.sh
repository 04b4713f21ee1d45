#!/usr/bin/env bash
# Pack what a bare, offline GPU machine needs to build and run dspark, into an ignored folder.
#
#   bash scripts/pack_for_device.sh [OUT]          # default OUT: .device  (git-ignored)
#
# OUT/llama-cpp-python/  llama-cpp-python's sdist with dspark's patches applied, trimmed to its build inputs
#                        (no models/, docs, tests, examples, other GPU backends' sources)
# OUT/wheels/            wheels for Python 3.12 on x86_64 Linux: dspark's dependencies and llama-cpp-python's,
#                        gguf (scripts/device_check.py writes its models with it), scikit-build-core for the build
# OUT/applied-patches    which of dspark's llama.cpp patches the source carries (all of the series; a patch that
#                        does not apply stops the pack, as it stops scripts/install.sh)
#
# On the machine (CMake, ninja, nvcc and Python 3.12 there; no network):
#   DSPARK_PACK=OUT bash scripts/install.sh --test
# builds llama-cpp-python with -DGGML_CUDA=on for the GPU's own architecture, in parallel, installs everything
# from OUT/wheels, and downloads nothing. Keep OUT under 64 MiB (it is checked below).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/.device}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
py_version="${DSPARK_PACK_PYTHON:-3.12}"
log() { echo "pack_for_device: $*" >&2; }

rm -rf "$out" && mkdir -p "$out/wheels"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "llama-cpp-python $version sdist"
"$python" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src="$(ls -d "$tmp"/llama_cpp_python-*/ | head -n1)"
# The same patches, applied the same way as install.sh does (its --apply-patches: series order, no fuzz, and
# a patch that does not apply stops the pack; DSPARK_LLAMA_PATCHES=0 packs stock llama.cpp).
LLAMA_CPP_PYTHON_VERSION="$version" bash "$here/scripts/install.sh" --apply-patches "$src/vendor/llama.cpp" \
  > "$out/applied-patches"
# What the build never reads (llama.cpp is built as a subdirectory: its tests, tools and examples are off,
# but the multimodal library under tools/mtmd is built by llama-cpp-python).
rm -rf "$src"/{.git,.github,docs,examples,tests,docker,mkdocs.yml}
v="$src/vendor/llama.cpp"
rm -rf "$v"/{models,docs,tests,examples,benches,conversion,scripts,gguf-py,media,.github,.devops}
find "$v/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt -exec rm -rf {} +
# Other backends' sources (their directories are only entered when that backend is switched on).
rm -rf "$v"/ggml/src/{ggml-sycl,ggml-vulkan,ggml-opencl,ggml-hexagon,ggml-et,ggml-openvino,ggml-webgpu,ggml-cann,ggml-virtgpu,ggml-metal}
mv "$src" "$out/llama-cpp-python"

log "wheels for Python $py_version (x86_64 Linux)"
"$python" - "$here/pyproject.toml" > "$tmp/requirements.txt" <<'PY'
import sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = [r for r in project["dependencies"] if not r.startswith("llama-cpp-python")]
reqs += [r for r in project["optional-dependencies"]["test"] if r.startswith("gguf")]
# llama-cpp-python's own dependencies, and its build backend
reqs += ["typing-extensions>=4.5", "diskcache>=5.6.1", "jinja2>=2.11.3", "scikit-build-core>=0.9.2",
         "setuptools>=68", "wheel"]  # and dspark's own build backend
reqs += ["pip>=24"]  # a pip that resolves for another Python (23.x checked Requires-Python against its own)
print("\n".join(reqs))
PY
"$python" -m pip download -q --only-binary :all: --python-version "$py_version" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform linux_x86_64 -d "$out/wheels" -r "$tmp/requirements.txt"
size=$(du -sm "$out" | cut -f1)
log "packed $out: ${size} MiB"
if (( size >= 64 )); then
  log "error: the pack is ${size} MiB, over the 64 MiB that travels"
  exit 1
fi
echo "$out"
