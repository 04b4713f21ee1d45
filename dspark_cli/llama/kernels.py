"""dspark's exactness policy, in one place: which batches its kernels keep bit-identical to one-token decoding,
which of its llama.cpp patches a build carries, and the one switch that trades exactness for speed.

- EXACT_BATCH_MAX: the largest verify batch (drafted tokens + 1) that dspark's patched CPU kernels keep
  bit-identical to one-token decoding; larger batches are prompts and take llama.cpp's fast kernels. It must
  equal the patches' DSPARK_INVARIANT_BATCH and DSPARK_ROWS_BATCH (tests/test_kernels.py checks it).
- dspark_patches(): what scripts/install.sh built in (it leaves the list in the llama_cpp package).
- DSPARK_FAST_KERNELS=1: the user chose speed over bit-exactness (llama.cpp's fast batch kernels and flash
  attention stay on; greedy output may then differ from the target alone at near-ties). Read here only.
"""

from __future__ import annotations

import importlib.util
import os

# dspark's llama.cpp patches (scripts/llama-cpp-patches/) and what each buys, for doctor's advice.
KERNEL_PATCHES = {
    "dspark-cpu-kernels": "F32 verify batches about 2x faster, Q4_1 drafts 1.3x",
    "dspark-kquant-tiles": "Q4_K/Q6_K verify batches and prefill 1.1-1.3x faster, still exact",
    "dspark-prefill-fast-paths": "prompts through llama.cpp's fast batch kernels (prefill 1.6x on a Q4_K_M target), "
                                 "repacked Q4_K, Q4_0 and IQ4_NL decoding (1.2-1.7x), verify batches still exact",
    "dspark-q5_K-tiles": "Q5_K verify batches 2x faster (Q5_K_M files), still exact",
    "dspark-q8_0-tiles": "Q8_0/Q4_0/Q5_0 verify batches 1.7-1.9x faster (Q8_0 targets, most drafts), still exact",
    "dspark-f16-tiles": "F16 verify batches about 2x faster (F16 targets), still exact",
    "dspark-verify-chunks": "verify batches in 128-row chunks: 5-18% faster, the same bits",
}
# The largest batch the patched kernels keep bit-identical to one-token decoding (DSPARK_INVARIANT_BATCH in
# dspark-prefill-fast-paths): a verify batch is the drafted tokens plus one, so at most this minus one are drafted.
EXACT_BATCH_MAX = 16


def default_verify_max(model) -> int | None:
    """The engine's verify bound before any proof: on the CPU (or an RPC server, often one) dspark's kernels keep
    batches of up to EXACT_BATCH_MAX tokens bit-identical to one-token decoding, larger ones are prompts (fast
    kernels); elsewhere no bound is known (llama/proof.py finds one)."""
    return EXACT_BATCH_MAX if model.on_cpu or model.remote else None


def dspark_patches(pkg_dir: str | None = None) -> list[str] | None:
    """dspark's llama.cpp patches that scripts/install.sh built into this llama-cpp-python ([] for none), or None
    when it was installed some other way (then nobody knows). install.sh leaves the list in the package. Libraries
    loaded from elsewhere (LLAMA_CPP_LIB_PATH, as llama-cpp-python reads it) carry the package's list only if
    their own folder has one: a stock build pointed at that way is unknown, not the package's build."""
    if pkg_dir is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.origin:
            return None
        pkg_dir = os.path.dirname(spec.origin)
        lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH")
        if lib_dir and os.path.realpath(lib_dir) != os.path.realpath(os.path.join(pkg_dir, "lib")):
            pkg_dir = lib_dir
    try:
        with open(os.path.join(pkg_dir, ".dspark-patches")) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError:
        return None


def build_exactness(patches: list[str] | None) -> tuple[str, str]:
    """What this build promises about exactness before any proof, for doctor: (state, words). state is "exact"
    (every dspark patch: verify batches of up to EXACT_BATCH_MAX tokens match one-token decoding by construction
    on the CPU), "partial", "stock", "fast" (DSPARK_FAST_KERNELS=1) or "unknown"; only the proof at load
    (llama/proof.py) turns any of them into "proven" for a model, a device and this build."""
    if fast_kernels():
        return "fast", ("speed chosen over exactness (DSPARK_FAST_KERNELS=1): llama.cpp's batch kernels; "
                        "the proof at load says which verify batches still match")
    if patches is None:
        return "unknown", ("unknown: this llama.cpp was not built by scripts/install.sh, so nothing says which "
                           "kernels it has; only the proof at load can tell")
    if not patches:
        return "stock", ("stock llama.cpp: its CPU batch kernels are not row-invariant (greedy output may differ "
                         "from the target alone); the proof at load says which verify batches still match")
    missing = [name for name in KERNEL_PATCHES if name not in patches]
    if missing:
        return "partial", (f"dspark's kernels without {', '.join(missing)}: verify batches of the weight types "
                           "those cover may not match; the proof at load says")
    return "exact", (f"dspark's kernels (every patch): on the CPU, verify batches of up to {EXACT_BATCH_MAX} tokens "
                     "match one-token decoding by construction; the proof at load confirms it per model")


def fast_kernels() -> bool:
    """DSPARK_FAST_KERNELS=1: speed over bit-exactness."""
    return os.environ.get("DSPARK_FAST_KERNELS") == "1"


def tiled_mm_off() -> bool:
    """Whether GGML_CPU_TILED_MM=0 must be set before the first model loads. llama.cpp's CPU backend sends
    K-quant (Q4_K, Q5_K, Q6_K, ...) matmuls of 8 or more tokens through its tiled kernel, which sums in another
    order than the one-token path: a token's logits then move by up to ~0.6 between a verify batch and plain
    decoding, enough to flip greedy near-ties. A build with dspark's prefill-fast-paths patch keeps that kernel to
    prompts itself; any other build needs it off, unless the user chose speed (fast_kernels())."""
    return not fast_kernels() and "dspark-prefill-fast-paths" not in (dspark_patches() or [])
