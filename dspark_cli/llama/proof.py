"""The proof at load: on this model file, this build and this device, does a verify batch give every one of its rows
the very logits one-token decoding gives? dspark's promise (speculation never changes the answer) rests on it.

prove() evaluates a short fixed text one token at a time after a short prefix, then again as one batch of every
size from 2 to the largest verify the engine may send, and compares every logit of every row, bit for bit. The
largest size up to which every size matched is the verify bound that keeps output identical to the target alone
on this backend (`--exact` holds the engine to it). What it does not see: positions far into a long context
(the batches sit at the start of the cache); dspark's CPU settings keep attention the same at every length
(llama/model.py turns flash attention off there), elsewhere the verdict speaks for short contexts.

It runs once per (file, build, device): models/proofs.py keeps the verdicts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DsparkError
from .kernels import EXACT_BATCH_MAX

PREFIX = 4  # tokens in the cache before the compared ones: the batches attend to something
# Any text does; this one tokenizes to enough tokens in every vocabulary (it is repeated when it does not).
PROOF_TEXT = ("The proof compares a verify batch with one-token decoding, row by row, bit for bit. "
              "def add(a, b):\n    return a + b\n")


@dataclass(frozen=True)
class Verdict:
    """What the proof found. bound: the largest verify batch (in tokens) up to which every size gave every row
    one-token decoding's logits bit for bit (1: none did, or the proof could not run); checked: the sizes 2..checked
    were tried (0: none); differ: size -> the largest difference of a logit where that size did not match;
    reason: why the proof could not run; seconds: what it cost when it ran; cached: read from an earlier run."""

    bound: int
    checked: int
    differ: dict[int, float] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0
    cached: bool = False

    @property
    def proven(self) -> bool:
        """Every size checked matched: the engine's whole verify range is exact here."""
        return self.reason is None and self.checked >= 2 and not self.differ

    @property
    def label(self) -> str:
        """One line: "proven (batches <= 16)" or "no - <why>"."""
        if self.proven:
            return f"proven (batches <= {self.bound})"
        keeps = f"; exact up to {self.bound}" if self.bound >= 2 else ""  # (never with a reason: bound 1)
        return f"no - {self.why()}{keeps}"

    def why(self) -> str:
        """Which sizes differ and by how much (or why the proof could not run)."""
        if self.reason is not None:
            return f"not checked: {self.reason}"
        if not self.differ:
            return "every verify batch matched"
        worst = max(self.differ.values())
        by = "by NaN" if math.isnan(worst) else f"by up to {worst:.3g}"
        return f"verify batches of {_ranges(sorted(self.differ))} tokens differ from one-token decoding {by}"

    def as_dict(self) -> dict:
        return {"proven": self.proven, "bound": self.bound, "checked": self.checked,
                "differ": {str(k): (None if math.isnan(v) else v) for k, v in sorted(self.differ.items())},
                "reason": self.reason, "label": self.label}

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        """A stored verdict; ValueError when it is not one."""
        try:
            bound, checked = int(data["bound"]), int(data["checked"])
            differ = {int(k): (math.nan if v is None else float(v)) for k, v in dict(data["differ"]).items()}
            reason = data.get("reason")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a verdict ({e})") from None
        if not 1 <= bound <= max(1, checked) or (reason is not None and not isinstance(reason, str)):
            raise ValueError("not a verdict (its figures do not fit together)")
        return cls(bound, checked, differ, reason, cached=True)


def _ranges(sizes: list[int]) -> str:
    """[4, 5, 6, 9] -> "4-6, 9"."""
    runs: list[list[int]] = []
    for s in sizes:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def proof_tokens(model, n: int) -> list[int]:
    """n token ids of PROOF_TEXT in the model's vocabulary (repeated as needed; ids 0.. when it has no text)."""
    ids = model.tokenize(PROOF_TEXT, add_special=False) or list(range(min(model.n_vocab, 64)))
    return (ids * (n // len(ids) + 1))[:n]


def prove(model, largest: int = EXACT_BATCH_MAX) -> Verdict:
    """Run the proof on a loaded model whose sequence 0 is free (at load): its cache is empty again afterwards.
    Never raises for what the model cannot do (a context too small, a failed decode): the verdict says why."""
    t0 = time.perf_counter()
    need = PREFIX + largest
    if model.n_ctx < need or model.n_batch < largest:
        return Verdict(1, 0, reason=f"the context holds {model.n_ctx} tokens, the proof needs {need}")
    tokens = proof_tokens(model, need)
    differ: dict[int, float] = {}
    try:
        model.truncate(0)
        model.eval(tokens[:PREFIX], 0)
        # One-token decoding: the reference rows (copied: eval's view is valid until the next eval).
        reference = np.empty((largest, model.n_vocab), dtype=np.float32)
        for i in range(largest):
            reference[i] = model.eval([tokens[PREFIX + i]], 1)[0]
        for size in range(2, largest + 1):
            model.truncate(PREFIX)
            rows = model.eval(tokens[PREFIX : PREFIX + size], size)
            if not np.array_equal(rows.view(np.uint32), reference[:size].view(np.uint32)):
                with np.errstate(invalid="ignore"):
                    gap = np.abs(rows.astype(np.float64) - reference[:size])
                differ[size] = float(np.nanmax(gap)) if not np.all(np.isnan(gap)) else math.nan
    except DsparkError as e:
        return Verdict(1, 0, reason=e.message, seconds=time.perf_counter() - t0)
    finally:
        model.truncate(0)
    bound = min(differ, default=largest + 1) - 1
    return Verdict(max(1, bound), largest, differ, seconds=time.perf_counter() - t0)
