"""Token bytes in, printable text out.

Tokens are byte strings and a UTF-8 character can be split across two tokens, so bytes go through an
incremental decoder that holds an incomplete sequence until it completes. Stop strings are handled here
too: text that could be the start of a stop string is held back until it is known not to be one, so a stop
string is never printed, not even in part.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str] | tuple[str, ...] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False  # a stop string was seen; everything from it on is dropped
        self.text = ""  # all text released so far

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be shown now (possibly "")."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release whatever is held. An incomplete UTF-8 tail (an answer cut by
        --max-tokens inside a character) is dropped rather than shown as U+FFFD."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        if self._stop:
            cut = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._held = ""
                return self._emit(held[:cut])
            if not final:
                keep = self._partial_stop_suffix(held)
                self._held = held[len(held) - keep :] if keep else ""
                return self._emit(held[: len(held) - keep])
        self._held = ""
        return self._emit(held)

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, text: str) -> str:
        self.text += text
        return text
