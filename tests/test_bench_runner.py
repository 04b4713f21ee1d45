"""The runner's mismatch classification, on a stand-in target whose logits are chosen by the test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from dspark_cli.bench.runner import NEAR_TIE_LOGITS, _classify
from dspark_cli.bench.stats import RunRecord, check_identity


class FakeTarget:
    def __init__(self, logits):
        self.logits = np.asarray(logits, dtype=np.float32)
        self.asked = []

    def truncate(self, n):
        pass

    def sync(self, tokens, n_logits=1):
        self.asked.append(list(tokens))
        return self.logits[None, :]


def rec(variant, tokens):
    return RunRecord("p", "chat", variant, 0, tokens, len(tokens), 2, 0, 1, 0, 1, len(tokens), 0, 0, 0, [], [])


def classify(logits, base, spec):
    records = [rec("target", base), rec("draft@4", spec)]
    mm = check_identity(records)
    target = FakeTarget(logits)
    _classify(SimpleNamespace(target=target), {"p": [7, 8]}, records, mm)
    return mm, target


def test_a_flipped_near_tie_is_classified_as_such():
    logits = [0.0, 5.0, 5.0 + NEAR_TIE_LOGITS / 10, 1.0]
    mm, target = classify(logits, [1, 2, 1], [1, 1, 3])
    assert len(mm) == 1 and mm[0].position == 1
    assert mm[0].near_tie is True and mm[0].margin < NEAR_TIE_LOGITS
    assert target.asked == [[7, 8, 1]]  # the prompt plus the agreed tokens before the divergence


def test_a_clear_choice_overridden_is_a_real_mismatch():
    mm, _ = classify([0.0, 9.0, 2.0, 1.0], [1, 1], [1, 2])
    assert mm[0].near_tie is False and mm[0].margin > 1.0


def test_an_output_that_ends_early_uses_the_top_two():
    mm, _ = classify([0.0, 4.0, 4.0, 1.0], [1, 1, 1], [1, 1])
    assert mm[0].position == 2 and mm[0].near_tie is True
