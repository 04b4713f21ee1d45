"""Can this draft propose tokens for this target? The rule is llama.cpp's (common/speculative.cpp):
same vocabulary type, same BOS/EOS ids and add-BOS/add-EOS flags, sizes within 128 of each other, and the
same text for every token id from 5 up to the smaller size."""

from __future__ import annotations

from pathlib import Path

from ..errors import PairError
from .model import Model

VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5
_VOCAB_TYPES = {0: "none", 1: "SPM", 2: "BPE", 3: "WPM", 4: "UGM", 5: "RWKV", 6: "PLAMO2"}


def pairing_problem(target: Model, draft: Model) -> str | None:
    """A sentence naming the first difference that stops the pairing, or None when they pair."""
    if target.vocab_type != draft.vocab_type:
        return (
            f"vocabulary types differ: target {_VOCAB_TYPES.get(target.vocab_type, target.vocab_type)}, "
            f"draft {_VOCAB_TYPES.get(draft.vocab_type, draft.vocab_type)}"
        )
    for name in ("add_bos", "add_eos", "bos", "eos"):
        t, d = getattr(target, name), getattr(draft, name)
        if t != d:
            label = {"add_bos": "add-BOS flag", "add_eos": "add-EOS flag", "bos": "BOS id", "eos": "EOS id"}[name]
            return f"{label} differs: target {t}, draft {d}"
    diff = abs(target.n_vocab - draft.n_vocab)
    if diff > VOCAB_MAX_SIZE_DIFFERENCE:
        return (
            f"vocabulary sizes differ by {diff} (target {target.n_vocab}, draft {draft.n_vocab}; "
            f"at most {VOCAB_MAX_SIZE_DIFFERENCE} allowed)"
        )
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        t, d = target.token_text(i), draft.token_text(i)
        if t != d:
            return f"token {i} differs: target {t.decode('utf-8', 'replace')!r}, draft {d.decode('utf-8', 'replace')!r}"
    return None


def check_pair(target: Model, draft: Model, draft_name: str | None = None) -> None:
    """PairError when they cannot pair. draft_name: the draft as the user named it (default: its file's name; a
    derived copy, models/derive.py, is named by its source)."""
    problem = pairing_problem(target, draft)
    if problem:
        raise PairError(
            f"the draft {draft_name or draft.path.name} cannot pair with the target {target.path.name}: {problem}",
            hint="pick a draft from the same model family (same tokenizer), or run with --draft none",
        )


def vocab_report(target: Model, draft: Model) -> tuple[str, bool]:
    """How the draft's vocabulary relates to the target's: ("same vocabulary" | "padded (...)" | "different
    vocabulary (...): drafting through text", whether the draft must draft through text, engine/through_text.py)."""
    problem = pairing_problem(target, draft)
    if problem is not None:
        return f"different vocabulary ({problem}): drafting through text", True
    if draft.n_vocab != target.n_vocab:
        return f"padded (target {target.n_vocab} tokens, draft {draft.n_vocab})", False
    return "same vocabulary", False


def check_pair_files(target_path: str | Path, draft_path: str | Path) -> None:
    """The same check from two files, loading only their vocabularies (fast, no weights)."""
    target = Model(target_path, role="target", vocab_only=True)
    draft = Model(draft_path, role="draft", vocab_only=True)
    try:
        check_pair(target, draft)
    finally:
        draft.close()
        target.close()
