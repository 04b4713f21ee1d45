"""The drafting memory: what this process has written before, as a draft for what it writes next.

An agent loop, a tool asking for the same kind of JSON again and again, a server answering many users similar
questions: the best draft for an answer is often an earlier answer. Prompt lookup only sees the current prompt
and answer; the memory keeps every finished generation's answer (with the end of its prompt, so that an answer's
opening is found after the chat template's header) and proposes what followed the longest earlier match of the
text's last tokens, by vote where several earlier texts continue it (SuffixDecoding's idea, Oliaro et al. 2025,
over a token index rather than a suffix tree).

It costs nothing to draft from (no model runs), so the cost model weighs it like prompt lookup, with its own
acceptance by depth: it is used where it pays and ignored where it does not. A proposal never changes the output:
the target verifies it like any draft.

Bounded: `max_bytes` (an estimate of the tokens and the index held), the oldest texts evicted first.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque

KEY = 3  # tokens a match must share at least (and the index's key): shorter matches in a large memory are noise
MATCH_MAX = 32  # tokens compared back from the key: the longest evidence wins
CANDIDATES = 64  # most recent earlier occurrences of a key considered (a common key may have thousands)
SPLIT = 0.5  # a proposal stops where no more than this share of the matching texts agree on the next token
PROMPT_TAIL = 32  # prompt tokens kept before each answer (the template's header, the request's last words)
SEP = -1  # between texts: no match or continuation crosses it
BYTES_PER_KEY = 190  # a key's dict slot, its packed int and posting array (measured: tracemalloc, CPython 3.11)
_SHIFT = 21  # key packing: token ids below 2**21 (the largest vocabularies hold ~262k)


def _key(window) -> int:
    """KEY token ids packed into one int (the index's key)."""
    key = 0
    for t in window:
        key = (key << _SHIFT) | t
    return key


class DraftMemory:
    """Token texts this process wrote, indexed by every KEY-token window, and recall() of what followed."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.tokens = array("i")  # every remembered text, oldest first, each followed by SEP
        self.base = 0  # position (counted since the memory began) of tokens[0]: evicted texts came before it
        self.index: dict[int, array] = {}  # key of the KEY tokens ending at p - 1 -> positions p, ascending
        self.texts: deque[int] = deque()  # where each remembered text starts, oldest first (eviction order)
        self.n_entries = 0

    # ---- what it holds ------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.tokens) - len(self.texts)  # (each text's SEP is not a token)

    @property
    def nbytes(self) -> int:
        """An estimate of the memory held: the tokens, the index entries and keys."""
        return 4 * len(self.tokens) + 8 * self.n_entries + BYTES_PER_KEY * len(self.index)

    def __len__(self) -> int:
        return len(self.texts)

    def clear(self) -> None:
        self.__init__(self.max_bytes)

    # ---- remembering --------------------------------------------------------------------------------
    def add(self, seq: list[int], n_prompt: int) -> None:
        """Remember a finished generation: seq is its prompt (the first n_prompt tokens) and answer. Only the
        answer and the prompt's last PROMPT_TAIL tokens are kept: the prompt itself is what prompt lookup sees,
        and a conversation resent turn after turn would otherwise be kept again each turn."""
        if len(seq) <= n_prompt:
            return  # no answer: nothing was written
        text = seq[max(0, n_prompt - PROMPT_TAIL):]
        # A text that could fill more than half the bound (every key new) keeps its end (what comes next most
        # likely resembles).
        text = text[-(self.max_bytes // (4 + 8 + BYTES_PER_KEY) // 2):]
        if len(text) <= KEY:
            return
        start = self.base + len(self.tokens)
        self.texts.append(start)
        self.tokens.extend(text)
        self.tokens.append(SEP)
        for i in range(KEY, len(text)):
            key = _key(text[i - KEY:i])
            postings = self.index.get(key)
            if postings is None:
                postings = self.index[key] = array("q")
            postings.append(start + i)
        self.n_entries += len(text) - KEY
        if self.nbytes > self.max_bytes:
            self._evict(self.max_bytes * 3 // 4)  # well under the bound: evictions (a pass over the index) stay rare

    def _evict(self, target: int) -> None:
        """Forget the oldest texts until the estimate is under `target` bytes (the newest is always kept)."""
        while self.nbytes > target and len(self.texts) > 1:
            # As many of the oldest texts as the average cost per token says (keys that newer texts share stay:
            # then another round), at least one.
            keep = int(target * len(self.tokens) / self.nbytes)
            end = self.base + len(self.tokens)
            self.texts.popleft()
            while len(self.texts) > 1 and end - self.texts[0] > keep:
                self.texts.popleft()
            self._forget_before(self.texts[0])

    def _forget_before(self, position: int) -> None:
        del self.tokens[: position - self.base]
        self.base = position
        entries = 0
        for key in list(self.index):
            postings = self.index[key]
            cut = bisect.bisect_left(postings, position)
            if cut == len(postings):
                del self.index[key]
                continue
            if cut:
                del postings[:cut]
            entries += len(postings)
        self.n_entries = entries

    # ---- recalling ----------------------------------------------------------------------------------
    def recall(self, seq: list[int], n_max: int) -> list[int]:
        """Up to n_max tokens that followed the longest earlier matches of seq's end, where the texts that match
        agree ([] when nothing matches)."""
        if n_max <= 0 or len(seq) < KEY or not self.index:
            return []
        postings = self.index.get(_key(seq[-KEY:]))
        if postings is None:
            return []
        tokens, base = self.tokens, self.base
        best, group = 0, []
        tail = seq[-MATCH_MAX:]
        for p in reversed(postings[-CANDIDATES:]):
            at = p - base
            # How far back the match goes beyond the key (a SEP, never in seq, ends it).
            n = KEY
            while n < len(tail) and at - n - 1 >= 0 and tokens[at - n - 1] == tail[-n - 1]:
                n += 1
            if n > best:
                best, group = n, [at]
            elif n == best:
                group.append(at)
        out: list[int] = []
        end = len(tokens)
        while group and len(out) < n_max:
            votes: dict[int, list[int]] = {}
            for at in group:
                if at < end and tokens[at] != SEP:
                    votes.setdefault(tokens[at], []).append(at + 1)
            if not votes:
                break
            tok, agree = max(votes.items(), key=lambda kv: len(kv[1]))
            if len(agree) <= SPLIT * len(group) and len(group) > 1:
                break  # the evidence splits here: the draft stops rather than guess
            out.append(tok)
            group = agree
        return out
