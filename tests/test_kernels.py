"""The matrix kernels dspark's install patches into llama.cpp (scripts/llama-cpp-patches/) compute the right
numbers, not just the same numbers for a batch and a single token (test_engine_greedy checks that): the F32
demo target must agree with an F16 copy of itself, whose F16 tiles in turn agree with llama.cpp's own F16 kernel
(which still serves prompts), and the Q4_1 draft with the F32 target, which holds exactly the draft's weights
dequantized. A wrong stride or lane order in any kernel would scramble the logits far beyond these bounds.

Every model here decodes with the machine's every thread (CORES), as users run (all physical cores): a kernel's
thread split shows only with more than one, and under pytest-xdist a Model's default is one (DSPARK_THREADS, set
by tests/conftest.py). The session's shared demo pair gets its threads back after each test (every_core)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dspark_cli.llama.gguf_file import read_tensors
from dspark_cli.llama.quantize import requantize
from dspark_cli.llama.model import Model
from dspark_cli.prompt import build_prompt
from cores import CORES, every_core

pytestmark = pytest.mark.all_cores  # conftest.py: no other test beside these under pytest-xdist


def tensor_types(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, dims as the file lists them, type name) of each tensor in a GGUF, from its header alone."""
    from gguf import GGMLQuantizationType

    return [(name, dims, GGMLQuantizationType(kind).name) for name, dims, kind in read_tensors(path)]


def f16_copy(src: Path, out: Path) -> Path:
    import llama_cpp

    requantize(src, out, llama_cpp.LLAMA_FTYPE_MOSTLY_F16)
    return out


@pytest.fixture(scope="module")
def f16_path(demo_paths, tmp_path_factory) -> Path:
    """One F16 copy of the demo target for the module (the tiles' agreement and their bit-for-bit check)."""
    return f16_copy(demo_paths[0], tmp_path_factory.mktemp("f16") / "demo-target.F16.gguf")


@pytest.fixture(scope="module")
def f16_target(f16_path):
    model = Model(f16_path, role="target", n_ctx=512, n_threads=CORES)
    yield model
    model.close()


def logits(model: Model, seq: list[int], n: int) -> np.ndarray:
    """Logits of the last n tokens of seq, decoded as one batch (n = 1: the one-token path)."""
    model.truncate(0)
    model.sync(seq[:-n], n_logits=0)
    out = np.array(model.eval(seq[-n:], n_logits=n))
    model.truncate(0)
    return out


def assert_batches_match_one_token(path: Path, label: str) -> None:
    """Every row of every batch size a verify can have (2..16: odd sizes and tiles' tails included), bit for bit
    against decoding the same tokens one at a time through llama.cpp's own one-token dot products."""
    model = Model(path, role="target", n_ctx=512, n_threads=CORES)
    try:
        seq = model.tokenize("Water boils at one hundred degrees at sea level, but on a mountain it boils at a "
                             "lower temperature because the air pressure is lower up there.", add_special=True)
        base = len(seq) - 17
        assert base > 8
        model.sync(seq[:base], n_logits=0)
        alone = [np.array(model.eval([t], n_logits=1)[0]) for t in seq[base:base + 16]]
        for n in range(2, 17):
            model.truncate(base)
            rows = np.array(model.eval(seq[base:base + n], n_logits=n))
            for j in range(n):
                assert np.array_equal(rows[j], alone[j]), \
                    f"{label}: row {j} of a batch of {n}: max difference {np.abs(rows[j] - alone[j]).max()}"
    finally:
        model.close()


def batch_against_f32(f32_logits, path: Path, text: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The logits of text's last 12 tokens as one batch, through the F32 target and through the quantized copy at
    path: what the tiles compute against the numbers they approximate."""
    quant = Model(path, role="target", n_ctx=512, n_threads=CORES)
    try:
        return f32_logits(12), logits(quant, text, 12)
    finally:
        quant.close()


@pytest.fixture(scope="module")
def text(demo_models):
    target, _ = demo_models
    prompt, _ = build_prompt(target, "Explain how a refrigerator works, step by step.")
    return prompt + target.tokenize(
        " A refrigerator moves heat from the inside to the outside using a refrigerant that", add_special=False)


@pytest.fixture(scope="module")
def f32_logits(demo_models, text):
    """f32_logits(n): the F32 target's logits of text's last n tokens as one batch (every core), the reference the
    F16 copy, the Q4_1 draft and the quantized copies are held against; computed once a module for each n (the
    same numbers each time: it was computed afresh for each of the 9 tests that use it)."""
    target, _ = demo_models
    done: dict[int, np.ndarray] = {}

    def of(n: int) -> np.ndarray:
        if n not in done:
            with every_core(target):
                done[n] = logits(target, text, n)
        return done[n]

    return of


@pytest.mark.parametrize("n", [1, 7, 12])
def test_f32_kernels_agree_with_the_f16_copy(f32_logits, f16_target, text, n):
    a, b = f32_logits(n), logits(f16_target, text, n)
    assert np.abs(a - b).max() < 0.25  # F16 rounding of the weights: about 0.05 measured
    assert (a.argmax(axis=1) == b.argmax(axis=1)).all()


def test_f16_tiles_agree_with_llama_cpps_own_f16_kernel(f16_target, text):
    """Batches of up to 16 tokens go through dspark's F16 tiles (dspark-f16-tiles), longer ones (prompts) through
    llama.cpp's own F16 kernel: the last 12 positions of one 28-token batch against the same positions as a
    batch of 12 after the same 16-token prefix. They differ in summation order, and llama.cpp's kernel rounds
    the activations to F16, so a small difference and the same top tokens."""
    from dspark_cli.llama.kernels import EXACT_BATCH_MAX

    n = 12
    seq = text[-(EXACT_BATCH_MAX + n):]
    reference = logits(f16_target, seq, len(seq))[-n:]
    f16_target.truncate(0)
    f16_target.sync(seq[:EXACT_BATCH_MAX], n_logits=0)
    tiles = np.array(f16_target.eval(seq[-n:], n_logits=n))
    f16_target.truncate(0)
    assert np.abs(tiles - reference).max() < 0.1  # measured: 0.037 at most, 0.006 mean
    assert (tiles.argmax(axis=1) == reference.argmax(axis=1)).all()


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
def test_f16_batches_of_2_to_16_match_one_token_decoding(f16_path):
    """Every row of batches of 2..16 through an F16 copy (odd widths: tiles of 4 + 3 columns), bit for bit
    against one-token decoding."""
    assert_batches_match_one_token(f16_path, "F16")


@pytest.mark.parametrize("n", [1, 12])
def test_q4_1_kernel_agrees_with_the_dequantized_f32_target(demo_models, f32_logits, text, n):
    _, draft = demo_models
    a = f32_logits(12)
    with every_core(draft):
        if n == 12:
            b = logits(draft, text, 12)
        else:  # the one-token path, position by position (one prompt, then the 12 tokens one at a time)
            draft.truncate(0)
            draft.sync(text[:-12], n_logits=0)
            b = np.stack([np.array(draft.eval([t], n_logits=1)[0]) for t in text[-12:]])
            draft.truncate(0)
    # The draft quantizes its activations to 8 bits: about 0.2 mean and 1.1 max difference, 83-92% same top token.
    assert np.abs(a - b).mean() < 0.6
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.7


def test_f32_and_f16_kernels_on_odd_sizes(tmp_path):
    """A tiny F32 model whose rows (40 and 72 floats) end in a partial vector and whose matrices have row counts
    that do not fill the tiles, and its F16 copy: the kernels' tails, checked for batch invariance and against
    each other."""
    from synthetic import vocab, weights, write_model

    path = write_model(tmp_path / "odd.gguf", weights(7, len(vocab()[0]), n_embd=40, n_ff=72))
    f32 = Model(path, role="target", n_ctx=256, n_threads=CORES)
    f16 = Model(f16_copy(path, tmp_path / "odd.F16.gguf"), role="target", n_ctx=256, n_threads=CORES)
    try:
        seq = f32.tokenize("the cat sat on the mat and the big red dog ran to the sun in the day", add_special=True)
        assert len(seq) > 13
        for n in (1, 3, 5, 7, 12):
            batch = logits(f32, seq, n)
            alone = logits(f32, seq[: len(seq) - n + 1], 1)[0]
            assert np.array_equal(batch[0], alone), f"batch of {n}"
            batch_f16 = logits(f16, seq, n)
            assert np.array_equal(batch_f16[0], logits(f16, seq[: len(seq) - n + 1], 1)[0]), f"F16 batch of {n}"
            assert np.abs(batch - batch_f16).max() < 0.05
    finally:
        f16.close()
        f32.close()


# ---- K-quant tiles (dspark-kquant-tiles.patch) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def kquant_path(demo_paths, tmp_path_factory) -> Path:
    import llama_cpp

    out = tmp_path_factory.mktemp("kquant-tiles") / "demo-target.Q4_K_M.gguf"
    requantize(demo_paths[0], out, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    return out


def test_the_q4_k_m_copy_holds_both_tiled_types(kquant_path):
    tensors = tensor_types(kquant_path)
    types = {kind for _, _, kind in tensors}
    assert {"Q4_K", "Q6_K"} <= types, types
    # and Q4_K matrices whose row count llama.cpp repacks into 8-row blocks (dspark-prefill-fast-paths' kernels)
    assert any(kind == "Q4_K" and dims[1] % 8 == 0 for _, dims, kind in tensors)


def test_the_build_carries_the_dspark_kernels():
    from dspark_cli.llama.kernels import dspark_patches

    patches = dspark_patches()
    if patches is None or os.environ.get("DSPARK_LLAMA_PATCHES") == "0":
        pytest.skip("llama-cpp-python was not built by scripts/install.sh with dspark's patches")
    assert {"dspark-kquant-tiles", "dspark-prefill-fast-paths", "dspark-q5_K-tiles", "dspark-q8_0-tiles",
            "dspark-f16-tiles", "dspark-verify-chunks"} <= set(patches)


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
def test_k_quant_batches_of_2_to_16_match_one_token_decoding(kquant_path):
    """Every row of every batch size a verify can have (odd sizes and the tile's tail of 8 + 1 included), bit for
    bit against decoding the same tokens one at a time through llama.cpp's own Q4_K and Q6_K dot products."""
    assert_batches_match_one_token(kquant_path, "Q4_K_M")


def test_prompts_take_llama_cpps_fast_kernels(kquant_path):
    """dspark-prefill-fast-paths keeps llama.cpp's batch kernels (llamafile sgemm, the tiled K-quant matmul) for
    batches above 16 tokens, prompts: there the logits are llama.cpp's fast ones, a little apart from one-token
    decoding. Were the fast kernels not engaged (gated off, or built out), prompts would cost up to twice as much."""
    from dspark_cli.llama.kernels import EXACT_BATCH_MAX, dspark_patches

    if "dspark-prefill-fast-paths" not in (dspark_patches() or []) or os.environ.get("DSPARK_FAST_KERNELS") == "1":
        pytest.skip("this llama.cpp was not built with dspark-prefill-fast-paths")
    model = Model(kquant_path, role="target", n_ctx=512, n_threads=CORES)
    try:
        seq = model.tokenize("Water boils at one hundred degrees at sea level, but on a mountain it boils at a "
                             "lower temperature because the air pressure is lower up there, so cooking takes "
                             "longer and recipes need to be adjusted.", add_special=True)
        n = EXACT_BATCH_MAX + 8
        base = len(seq) - n
        assert base > 4
        model.sync(seq[:base], n_logits=0)
        alone = np.array([np.array(model.eval([t], n_logits=1)[0]) for t in seq[base:]])  # copies: eval reuses its buffer
        model.truncate(base)
        batch = np.array(model.eval(seq[base:], n_logits=n))
        assert not np.array_equal(batch, alone)
        # the same numbers up to summation order (measured: 0.20 mean, 1.3 at most, every top token alike)
        assert np.abs(batch - alone).mean() < 0.5
        assert (batch.argmax(axis=1) == alone.argmax(axis=1)).mean() >= 0.9
    finally:
        model.close()


# ---- Q8_0, Q5_0 tiles (dspark-q8_0-tiles.patch), Q5_K tiles (dspark-q5_K-tiles.patch), and the repacked 8x8
# Q4_0 and IQ4_NL layouts (dspark-prefill-fast-paths.patch: their gemm and gemv agree) --------------------------------
# file type -> the tensor type that serves; the demo's matrices all have row counts llama.cpp repacks (multiples of 8)
FAMILY = {"Q8_0": "Q8_0", "Q5_0": "Q5_0", "Q5_K_M": "Q5_K", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL"}


@pytest.fixture(scope="module", params=list(FAMILY))
def q8_0_family_path(request, demo_paths, tmp_path_factory) -> Path:
    import llama_cpp

    out = tmp_path_factory.mktemp("q8_0-tiles") / f"demo-target.{request.param}.gguf"
    requantize(demo_paths[0], out, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{request.param}"))
    return out


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
def test_q8_0_family_batches_of_2_to_16_match_one_token_decoding(q8_0_family_path):
    """Every row of batches of 2..16 (odd widths: a column without a partner; 9 = 5 + 4; for the repacked
    layouts groups of 4 tokens through the gemm and the rest through the gemv) bit for bit against one-token
    decoding through llama.cpp's own ggml_vec_dot_q8_0_q8_0 / _q5_0_q8_0 / _q5_K_q8_K, or its repacked gemv."""
    kind = FAMILY[q8_0_family_path.stem.split(".")[-1]]
    # the demo's rows of 576 fit K-quant blocks only in ffn_down: fewer Q5_K matrices
    assert sum(t == kind for _, _, t in tensor_types(q8_0_family_path)) >= (5 if kind == "Q5_K" else 20)
    assert_batches_match_one_token(q8_0_family_path, kind)


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
def test_q4_0_tiles_and_repacked_q4_0_in_one_model(tmp_path):
    """A tiny Q4_0 model whose attention matrices (64 rows) llama.cpp repacks into 8-row blocks and whose FFN
    matrices (36 rows) it cannot, so those go through the Q4_0 tiles: batches of 2..16 bit-identical either way."""
    import llama_cpp
    from synthetic import vocab, weights, write_model

    f32 = write_model(tmp_path / "odd.gguf", weights(11, len(vocab()[0]), n_embd=64, n_ff=36))
    path = tmp_path / "odd.Q4_0.gguf"
    requantize(f32, path, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    rows = [dims[1] for _, dims, kind in tensor_types(path) if kind == "Q4_0"]
    assert any(r % 8 == 0 for r in rows) and any(r % 8 for r in rows), rows
    assert_batches_match_one_token(path, "Q4_0, repacked and tiled")


def test_q8_0_family_batches_agree_with_the_f32_target(f32_logits, q8_0_family_path, text):
    """The tiles compute the right numbers: a batch of 12 against the F32 original. Scrambled lanes, a wrong
    column pairing or a wrong unpacking would leave nothing alike."""
    a, b = batch_against_f32(f32_logits, q8_0_family_path, text)
    # measured mean difference and top tokens alike: Q8_0 0.19 / 12 of 12, Q5_0 0.99 / 9, Q4_0 2.00 / 8, IQ4_NL
    # 1.65 / 10 (the quantization's own error: the one-token path gives the same)
    bound, alike = {"Q8_0": (0.4, 0.9), "Q5_0": (1.5, 0.6), "Q4_0": (2.5, 0.5),
                    "Q5_K_M": (1.2, 0.7), "IQ4_NL": (2.2, 0.6)}[q8_0_family_path.stem.split(".")[-1]]
    assert np.abs(a - b).mean() < bound
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= alike


def test_k_quant_batches_agree_with_the_f32_target(f32_logits, kquant_path, text):
    """The tiles compute the right numbers, not only the one-token kernel's: a batch of 12 through the Q4_K_M copy
    against the F32 original (4-bit weights and 8-bit activations: a bounded difference). Scrambled lanes or
    strides would leave nothing alike."""
    a, b = batch_against_f32(f32_logits, kquant_path, text)
    # Measured: 0.83 mean difference and 10 of 12 top tokens alike, the same as the one-token path gives.
    assert np.abs(a - b).mean() < 1.2
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.7
