"""Tiny llama-architecture GGUF models written with the `gguf` package: real files that real llama.cpp
loads and runs in milliseconds, with weights we control (a draft = the target plus noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2

WORDS = ["▁the", "▁a", "▁cat", "▁dog", "▁sat", "▁on", "▁mat", "▁and", "▁ran", "▁to", "▁big", "▁red",
         "▁is", "▁it", "▁was", "▁in", "▁of", "▁hat", "▁sun", "▁day", "s", "ed", "ing", "▁", "."]


def vocab(extra_words: int = 0) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte tokens (SPM byte fallback)
    words = WORDS + [f"▁w{i}" for i in range(extra_words)]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * 259 + [-float(i + 1) for i in range(len(words))]
    return tokens, scores, types


def weights(seed: int, n_vocab: int, scale_out: float = 1.0, *, n_embd: int = N_EMBD,
            n_ff: int = N_FF) -> dict[str, np.ndarray]:
    N_EMBD, N_FF = n_embd, n_ff  # noqa: N806 (the shapes below read as the model's own names)
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    t = {
        "token_embd.weight": r(n_vocab, N_EMBD, s=0.5),
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": r(n_vocab, N_EMBD, s=0.3 * scale_out),
    }
    for i in range(N_LAYER):
        t[f"blk.{i}.attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        t[f"blk.{i}.attn_q.weight"] = r(N_EMBD, N_EMBD)
        t[f"blk.{i}.attn_k.weight"] = r(N_EMBD, N_EMBD)
        t[f"blk.{i}.attn_v.weight"] = r(N_EMBD, N_EMBD)
        t[f"blk.{i}.attn_output.weight"] = r(N_EMBD, N_EMBD)
        t[f"blk.{i}.ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        t[f"blk.{i}.ffn_gate.weight"] = r(N_FF, N_EMBD)
        t[f"blk.{i}.ffn_up.weight"] = r(N_FF, N_EMBD)
        t[f"blk.{i}.ffn_down.weight"] = r(N_EMBD, N_FF)
    return t


def perturbed(base: dict[str, np.ndarray], seed: int, noise: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape).astype(np.float32) * noise * (v.std() or 1.0)).astype(np.float32)
            if not k.endswith("norm.weight") else v.copy() for k, v in base.items()}


def write_model(path: Path, tensors: dict[str, np.ndarray], *, extra_words: int = 0, eos_id: int = 2) -> Path:
    import gguf

    tokens, scores, types = vocab(extra_words)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("dspark-synthetic")
    n_embd, n_ff = tensors["token_embd.weight"].shape[1], tensors["blk.0.ffn_up.weight"].shape[0]
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(n_embd // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_pair(directory: Path, *, noise: float = 0.3) -> tuple[Path, Path]:
    """(target, draft): the draft is the target's weights plus noise, so it agrees often but not always."""
    n_vocab = len(vocab()[0])
    base = weights(1234, n_vocab)
    target = write_model(directory / "tiny-target.gguf", base)
    draft = write_model(directory / "tiny-draft.gguf", perturbed(base, 99, noise))
    return target, draft


def make_padded_pair(directory: Path, *, pad: str, extra: int = 64, noise: float = 0.3) -> tuple[Path, Path]:
    """(target, draft) whose vocabularies differ in size as real pairs' do (Qwen2.5 7B+ has 152,064 tokens, its
    0.5B draft 151,936): `pad` is "target" or "draft", the one with `extra` more tokens at the end. The extra
    rows have weights of their own, so the padded model does put probability on them."""
    n_vocab = len(vocab()[0])
    big = weights(1234, n_vocab + extra)
    small = {k: (v[:n_vocab] if k in ("token_embd.weight", "output.weight") else v) for k, v in big.items()}
    target_w, draft_w = (big, small) if pad == "target" else (small, big)
    target = write_model(directory / f"padded-{pad}-target.gguf", target_w, extra_words=extra if pad == "target" else 0)
    draft = write_model(directory / f"padded-{pad}-draft.gguf", perturbed(draft_w, 99, noise),
                        extra_words=extra if pad == "draft" else 0)
    return target, draft


def _rewrite(src: Path, dst: Path, value_of, rows_of) -> Path:
    """A copy of a GGUF with each metadata value passed through value_of(key, value) and each tensor's data
    through rows_of(name, data), types kept."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(key, value_of(key, field.contents()), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, rows_of(t.name, np.asarray(t.data)), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


VOCAB_ROWS = ("token_embd.weight", "output.weight")  # the tensors with a row per token


def pad_vocabulary(src: Path, dst: Path, extra: int = 64, copy_rows: list[int] | None = None) -> Path:
    """A copy of a real GGUF with `extra` unused tokens appended to its vocabulary and zero rows to its token
    embedding (and output matrix), as model makers pad vocabularies to a round size. copy_rows: the padded
    rows are copies of these tokens' rows instead (untrained padding is rarely zero), so the padded ids
    compete with the real ones for probability."""
    grow = {
        "tokenizer.ggml.tokens": [f"<|dspark_pad_{i}|>" for i in range(extra)],
        "tokenizer.ggml.token_type": [5] * extra,  # LLAMA_TOKEN_TYPE_UNUSED
        "tokenizer.ggml.scores": [0.0] * extra,
    }

    def rows(name, data):
        if name not in VOCAB_ROWS:
            return data
        pad = data[list(copy_rows)] if copy_rows is not None else np.zeros((extra,) + data.shape[1:], dtype=data.dtype)
        return np.concatenate([data, pad])

    return _rewrite(src, dst, lambda key, value: list(value) + grow[key] if key in grow else value, rows)


def permute_vocabulary(src: Path, dst: Path, first: int = 100) -> Path:
    """A copy of a real GGUF whose token ids from `first` on come in reverse order (the token texts, types and
    scores, and the embedding and output rows, moved together): the same model and tokenizer, but a vocabulary
    whose ids mean other texts than the original's, as a draft of another family has. What it writes as text is
    what the original writes."""
    import gguf

    n_vocab = len(gguf.GGUFReader(str(src)).fields["tokenizer.ggml.tokens"].contents())
    order = list(range(first)) + list(range(n_vocab - 1, first - 1, -1))  # new id -> old id
    per_token = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return _rewrite(src, dst, lambda key, value: [value[i] for i in order] if key in per_token else value,
                    lambda name, data: data[order] if name in VOCAB_ROWS else data)
