"""The drafting memory: what this process has written before, as a draft for what it writes next.

An agent loop, a tool asking for the same kind of JSON again and again, a server answering many users similar
questions: the best draft for an answer is often an earlier answer. Prompt lookup only sees the current prompt
and answer; the memory keeps every finished generation's answer (with the end of its prompt, so that an answer's
opening is found after the chat template's header) and proposes what followed the longest earlier match of the
text's last tokens, by vote where several earlier texts continue it (SuffixDecoding's idea, Oliaro et al. 2025,
over a token index rather than a suffix tree).

Where the text has just written something no earlier text holds (a name, a number: a record's values are new each
time), no match of its last tokens says where it stands, yet the text around the value often does: `"age": 52,`
then `\n  "city": "` in every earlier record. resume() finds the earlier answers that agree with this one on both
sides of the differing stretch (up to GAP tokens on either side) and proposes what came next in them. That
evidence is weaker than an unbroken match, so its proposals go to the cost model as a source of their own
(costs.SOURCE_RESUMED), with their own acceptance: drafted where they prove right, ignored where not.

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
GAP = 8  # the longest differing stretch (a value) resume() steps over, on either side
PROMPT_TAIL = 32  # prompt tokens kept before each answer (the template's header, the request's last words)
SEP = -1  # between texts: no match or continuation crosses it
BYTES_PER_KEY = 190  # a key's dict slot, its packed int and posting array (measured: tracemalloc, CPython 3.11)
BYTES_PER_TOKEN = 4 + 8 + 8  # a token, and its entry in each index
_SHIFT = 21  # key packing: token ids below 2**21 (the largest vocabularies hold ~262k)


def _key(window) -> int:
    """KEY token ids packed into one int (the index's key)."""
    key = 0
    for t in window:
        key = (key << _SHIFT) | t
    return key


class DraftMemory:
    """Token texts this process wrote, indexed by every KEY-token window and by every token, and recall() and
    resume() of what followed."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.tokens = array("i")  # every remembered text, oldest first, each followed by SEP
        self.base = 0  # position (counted since the memory began) of tokens[0]: evicted texts came before it
        self.index: dict[int, array] = {}  # key of the KEY tokens ending at p - 1 -> positions p, ascending
        self.after: dict[int, array] = {}  # token at p - 1 -> positions p, ascending (resume()'s candidates)
        self.texts: deque[int] = deque()  # where each remembered text starts, oldest first (eviction order)
        self.openings: deque[int] = deque()  # where each text's answer starts (after its prompt's tail)
        self.n_entries = 0

    # ---- what it holds ------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.tokens) - len(self.texts)  # (each text's SEP is not a token)

    @property
    def nbytes(self) -> int:
        """An estimate of the memory held: the tokens, the index entries and keys."""
        return 4 * len(self.tokens) + 8 * self.n_entries + BYTES_PER_KEY * (len(self.index) + len(self.after))

    def __len__(self) -> int:
        return len(self.texts)

    def heads(self) -> list[int]:
        """How many prompt tokens each text keeps before its answer, oldest first (what add() was given)."""
        return [opening - start for start, opening in zip(self.texts, self.openings)]

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
        head = len(text) - (len(seq) - n_prompt)  # the prompt's tokens kept before the answer
        # A text that could fill more than half the bound (every key new) keeps its end (what comes next most
        # likely resembles).
        kept = text[-(self.max_bytes // (BYTES_PER_TOKEN + 2 * BYTES_PER_KEY) // 2):]
        head, text = max(0, head - (len(text) - len(kept))), kept
        if len(text) <= KEY:
            return
        start = self.base + len(self.tokens)
        self.texts.append(start)
        self.openings.append(start + head)
        self.tokens.extend(text)
        self.tokens.append(SEP)
        for i in range(1, len(text)):
            _post(self.after, text[i - 1], start + i)
            if i >= KEY:
                _post(self.index, _key(text[i - KEY:i]), start + i)
        self.n_entries += 2 * len(text) - 1 - KEY
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
            self.openings.popleft()
            while len(self.texts) > 1 and end - self.texts[0] > keep:
                self.texts.popleft()
                self.openings.popleft()
            self._forget_before(self.texts[0])

    def _forget_before(self, position: int) -> None:
        del self.tokens[: position - self.base]
        self.base = position
        self.n_entries = _cut(self.index, position) + _cut(self.after, position)

    # ---- recalling ----------------------------------------------------------------------------------
    def recall(self, seq: list[int], n_max: int) -> list[int]:
        """Up to n_max tokens that followed the longest earlier matches of seq's end, where the texts that match
        agree ([] when nothing matches)."""
        if n_max <= 0 or len(seq) < KEY or not self.index:
            return []
        postings = self.index.get(_key(seq[-KEY:]))
        if postings is None:
            return []
        tail = seq[-MATCH_MAX:]
        best, group = 0, []
        for p in reversed(postings[-CANDIDATES:]):
            at = p - self.base
            n = self._agree(tail, len(tail), at)
            if n > best:
                best, group = n, [at]
            elif n == best:
                group.append(at)
        return self._follow(group, n_max)

    def resume(self, seq: list[int], n_max: int) -> list[int]:
        """Up to n_max tokens that followed the earlier answers agreeing with seq's end across a differing
        stretch: on seq's last tokens (fewer than two keys: a longer match that splits is where the texts truly
        part) and on at least two keys' worth in all, counting what agrees before a stretch of up to GAP tokens
        on either side that differs. Only agreement inside an earlier answer counts: the chat template's header
        before every answer would line any opening words up with any other. The best-agreeing answers vote as in
        recall()."""
        postings = self.after.get(seq[-1]) if n_max > 0 and seq else None
        if postings is None:
            return []
        tail = seq[-MATCH_MAX:]
        best, group = 2 * KEY - 1, []
        for p in reversed(postings[-CANDIDATES:]):
            at = p - self.base
            opening = self.openings[bisect.bisect_right(self.texts, p) - 1] - self.base
            n = self._agree(tail, len(tail), at, opening)
            if n >= 2 * KEY or n == 0:
                continue
            n += self._agree_across(tail, len(tail) - n, at - n, opening)
            if n > best:
                best, group = n, [at]
            elif n == best:
                group.append(at)
        return self._follow(group, n_max)

    def _agree(self, tail: list[int], s: int, t: int, lo: int = 0) -> int:
        """How many tokens tail[:s] and the memory's tokens[lo:t] agree on, going back (a SEP, never in a text,
        stops it)."""
        tokens, n = self.tokens, 0
        while n < s and t - n > lo and tokens[t - n - 1] == tail[s - n - 1]:
            n += 1
        return n

    def _agree_across(self, tail: list[int], s: int, t: int, lo: int) -> int:
        """The longest agreement of tail[:s - i] with tokens[lo:t - j] going back, over the skips 0 <= i, j <= GAP
        (where the agreement before stopped, tail[s - 1] and tokens[t - 1] differ, so both 0 finds nothing).
        tokens[lo:t] lies within one text."""
        start = max(lo, t - GAP - 1)
        window = self.tokens[start:t]
        best = 0
        for i in range(min(GAP, s - 1) + 1):
            x = tail[s - i - 1]
            if x not in window:
                continue
            for j in range(len(window) - 1, -1, -1):
                if window[j] == x:
                    best = max(best, self._agree(tail, s - i, start + j + 1, lo))
        return best

    def _follow(self, group: list[int], n_max: int) -> list[int]:
        """What the texts continuing at `group` (positions in tokens) go on with, token by token while more than
        SPLIT of them agree."""
        tokens, out, end = self.tokens, [], len(self.tokens)
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


def _post(index: dict[int, array], key: int, position: int) -> None:
    postings = index.get(key)
    if postings is None:
        postings = index[key] = array("q")
    postings.append(position)


def _cut(index: dict[int, array], position: int) -> int:
    """Drop an index's positions before `position`: returns the entries left."""
    entries = 0
    for key in list(index):
        postings = index[key]
        cut = bisect.bisect_left(postings, position)
        if cut == len(postings):
            del index[key]
            continue
        if cut:
            del postings[:cut]
        entries += len(postings)
    return entries
