"""llama.cpp's draft/target pairing rule, on real files."""

import pytest
from synthetic import vocab, weights, write_model

from dspark_cli.errors import PairError
from dspark_cli.llama.vocab import check_pair_files


def test_demo_pair_pairs(demo_paths):
    check_pair_files(*demo_paths)


def test_tiny_pair_pairs(tiny_paths):
    check_pair_files(*tiny_paths)


def test_vocab_size_difference_over_128(tmp_path, tiny_paths):
    n = len(vocab(200)[0])
    big = write_model(tmp_path / "big.gguf", weights(5, n), extra_words=200)
    with pytest.raises(PairError, match="sizes differ by 200"):
        check_pair_files(tiny_paths[0], big)


def test_eos_id_differs(tmp_path, tiny_paths):
    n = len(vocab()[0])
    other = write_model(tmp_path / "eos.gguf", weights(5, n), eos_id=1)
    with pytest.raises(PairError, match="EOS id differs: target 2, draft 1"):
        check_pair_files(tiny_paths[0], other)


def test_different_tokenizer_family(demo_paths, tiny_paths):
    with pytest.raises(PairError, match="vocabulary types differ: target BPE, draft SPM"):
        check_pair_files(demo_paths[0], tiny_paths[1])
