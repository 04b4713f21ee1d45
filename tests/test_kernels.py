"""The matrix kernels dspark's install patches into llama.cpp (scripts/llama-cpp-patches/) compute the right
numbers, not just the same numbers for a batch and a single token (test_engine_greedy checks that): the F32
demo target must agree with an F16 copy of itself, which llama.cpp computes through its own F16 kernels, and
the Q4_1 draft with the F32 target, which holds exactly the draft's weights dequantized. A wrong stride or
lane order in either kernel would scramble the logits far beyond these bounds. Both hold for stock
llama.cpp too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dspark_cli.demo import requantize
from dspark_cli.model import Model
from dspark_cli.prompt import build_prompt


def f16_copy(src: Path, out: Path) -> Path:
    import llama_cpp

    requantize(src, out, llama_cpp.LLAMA_FTYPE_MOSTLY_F16)
    return out


@pytest.fixture(scope="module")
def f16_target(demo_paths, tmp_path_factory):
    model = Model(f16_copy(demo_paths[0], tmp_path_factory.mktemp("f16") / "demo-target.F16.gguf"), role="target",
                  n_ctx=512)
    yield model
    model.close()


def logits(model: Model, seq: list[int], n: int) -> np.ndarray:
    """Logits of the last n tokens of seq, decoded as one batch (n = 1: the one-token path)."""
    model.truncate(0)
    model.sync(seq[:-n], n_logits=0)
    out = np.array(model.eval(seq[-n:], n_logits=n))
    model.truncate(0)
    return out


@pytest.fixture(scope="module")
def text(demo_models):
    target, _ = demo_models
    prompt, _ = build_prompt(target, "Explain how a refrigerator works, step by step.")
    return prompt + target.tokenize(
        " A refrigerator moves heat from the inside to the outside using a refrigerant that", add_special=False)


@pytest.mark.parametrize("n", [1, 7, 12])
def test_f32_kernels_agree_with_llama_cpps_f16_path(demo_models, f16_target, text, n):
    target, _ = demo_models
    a, b = logits(target, text, n), logits(f16_target, text, n)
    assert np.abs(a - b).max() < 0.25  # F16 rounding of weights and activations: about 0.05 measured
    assert (a.argmax(axis=1) == b.argmax(axis=1)).all()


@pytest.mark.parametrize("n", [1, 12])
def test_q4_1_kernel_agrees_with_the_dequantized_f32_target(demo_models, text, n):
    target, draft = demo_models
    a, b = logits(target, text, 12), logits(draft, text, 12)
    if n == 1:  # the one-token path, position by position
        b = np.stack([logits(draft, text[: len(text) - i], 1)[0] for i in range(11, -1, -1)])
    # The draft quantizes its activations to 8 bits: about 0.2 mean and 1.1 max difference, 83-92% same top token.
    assert np.abs(a - b).mean() < 0.6
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.7


def test_f32_kernels_on_odd_sizes(tmp_path):
    """A tiny F32 model whose rows (40 and 72 floats) end in a partial vector and whose matrices have row counts
    that do not fill the tiles: the kernel's tails, checked for batch invariance and against llama.cpp's F16 path."""
    from synthetic import vocab, weights, write_model

    path = write_model(tmp_path / "odd.gguf", weights(7, len(vocab()[0]), n_embd=40, n_ff=72))
    f32 = Model(path, role="target", n_ctx=256)
    f16 = Model(f16_copy(path, tmp_path / "odd.F16.gguf"), role="target", n_ctx=256)
    try:
        seq = f32.tokenize("the cat sat on the mat and the big red dog ran to the sun in the day", add_special=True)
        assert len(seq) > 13
        for n in (1, 3, 5, 7, 12):
            batch = logits(f32, seq, n)
            alone = logits(f32, seq[: len(seq) - n + 1], 1)[0]
            assert np.array_equal(batch[0], alone), f"batch of {n}"
            assert np.abs(batch - logits(f16, seq, n)).max() < 0.05
    finally:
        f16.close()
        f32.close()
