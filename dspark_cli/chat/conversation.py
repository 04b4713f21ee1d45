"""A multi-turn conversation as messages and as the exact token ids the models have in their KV caches.

No terminal code here: `dspark chat` drives it, tests drive it directly.

A turn's prompt is built by prompt.Continuation: (tokens already in context: the previous prompt and the
answer's own tokens) + tokens(the rendered tail), where the tail is what the template writes after the
previous answer's text: the end of that turn (e.g. `<|im_end|>\\n`), the new user message and the assistant
header. So only the new tokens are processed, and exactly the ones the models have.

The end-of-turn token is never yielded by the engine (it stops on it), and an interrupted or cut answer
has none; the template's own closing text in the tail supplies it in every case, so each turn is closed
the way the template closes it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptError
from ..files import open_append, write_atomic
from ..llama.model import Model
from ..prompt import ChatTemplate, Continuation, min_tokens, tokenize_prompt
from ..engine.stats import FINISH_ERROR, FINISH_INTERRUPTED, Rates



@dataclass
class TurnPrompt:
    tokens: list[int]  # the whole prompt for the answer
    n_reusable: int  # of them, tokens that were in context after the previous answer (the rest is new)
    dropped_turns: int = 0  # oldest turns dropped to make room (the prompt is then re-processed once)


@dataclass
class SessionTotals(Rates):
    """Counters over every answer of the session (/stats)."""

    turns: int = 0
    interrupted: int = 0
    n_generated: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    n_target_steps: int = 0
    t_generation: float = 0.0
    n_prompt: int = 0
    n_prompt_evaluated: int = 0
    n_prompt_evaluated_draft: int = 0
    t_prompt: float = 0.0
    dropped_turns: int = 0
    engine: str = ""  # the engine of the latest answer

    def add(self, stats, finish: str | None) -> None:
        self.turns += 1
        self.engine = stats.engine
        self.interrupted += finish == FINISH_INTERRUPTED
        self.n_generated += stats.n_generated
        self.n_drafted += stats.n_drafted
        self.n_accepted += stats.n_accepted
        self.n_target_steps += stats.n_target_steps
        self.t_generation += stats.t_generation
        self.n_prompt += stats.n_prompt
        self.n_prompt_evaluated += stats.n_prompt_evaluated
        self.n_prompt_evaluated_draft += stats.n_prompt_evaluated_draft
        self.t_prompt += stats.t_prompt


class Conversation:
    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.template = ChatTemplate(model)
        self._check_system(system)
        self.system = system or None
        self.messages: list[dict] = []  # alternating user/assistant that still fit the context
        self.log: list[dict] = []  # every message since the last reset, dropped ones too (/save)
        self._start_log()
        self._context = Continuation(model)  # what the caches hold after the last answer
        self._pending: tuple[str, str, list[int]] | None = None  # (user text, rendered prompt, prompt tokens)

    # ---- state changes from commands ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the turns; the system prompt stays. The caches keep the system prompt's prefix anyway."""
        self.messages.clear()
        self.log.clear()
        self._start_log()
        self._context.forget()
        self._pending = None

    def set_system(self, text: str | None) -> None:
        """Set (or clear) the system prompt; PromptError, and nothing changes, when it is too long."""
        self._check_system(text)
        self.system = text or None
        self.log.append(self._record("system", self.system or ""))
        self._context.forget()  # it sits at the start: the next prompt is rendered and processed whole

    @property
    def n_turns(self) -> int:
        return len(self.messages) // 2

    # ---- one turn -------------------------------------------------------------------------------------
    def begin_turn(self, user_text: str, *, reserve: int) -> TurnPrompt:
        """The prompt for answering `user_text`, leaving `reserve` tokens of the context for the answer
        when possible: if it does not fit, the oldest turns are dropped (the system prompt is kept) until
        a quarter of the context is free besides the reserve. Raises
        PromptError when even the message alone does not fit; the conversation is then unchanged."""
        n_ctx = self.model.n_ctx
        user = {"role": "user", "content": user_text}
        alone = self._with_system([user])
        if min_tokens(self.model, "".join(m["content"] for m in alone)) >= n_ctx:
            self._too_long(min_tokens(self.model, "".join(m["content"] for m in alone)), at_least=True)
        rendered = self.template.render(self._with_system(self.messages + [user]))
        tokens, n_reusable = self._context.tokens_for(rendered)
        dropped = 0
        if len(tokens) + reserve > n_ctx and self.messages:
            # The message alone must fit before any turn is dropped for it (a huge paste is refused at once).
            by_itself = self.template.render(alone)
            n_alone = len(tokenize_prompt(self.model, by_itself.text, by_itself.protect))
            if n_alone >= n_ctx:
                self._too_long(n_alone)
            # Dropping turns costs re-processing everything after the system prompt, so drop enough at once
            # to leave a quarter of the context free for the turns that follow, not just this one: the fewest
            # turns that do, found in log2(turns) tokenizations rather than one per turn.
            goal = n_ctx - n_ctx // 4
            lo, hi, best = 1, len(self.messages) // 2, None
            while lo <= hi:
                mid = (lo + hi) // 2
                r = self.template.render(self._with_system(self.messages[mid * 2 :] + [user]))
                t = tokenize_prompt(self.model, r.text, r.protect)
                if len(t) + reserve <= goal:
                    best, hi = (mid, r, t), mid - 1
                else:
                    lo = mid + 1
            if best is None:  # even with every turn dropped it leaves less than the goal: drop them all
                r = self.template.render(alone)
                best = (len(self.messages) // 2, r, tokenize_prompt(self.model, r.text, r.protect))
            dropped, rendered, tokens = best
            n_reusable = 0
        if len(tokens) >= n_ctx:
            self._too_long(len(tokens))
        if dropped:
            del self.messages[: dropped * 2]
        self._pending = (user_text, rendered.text, tokens)
        self.log.append(self._record("user", user_text))
        return TurnPrompt(tokens, n_reusable, dropped)

    def end_turn(self, answer_text: str, answer_tokens: list[int], finish: str | None, stats: dict | None = None) -> dict:
        """Record the answer (complete, cut or interrupted) and what the caches now hold. Returns the
        assistant record for the transcript."""
        if self._pending is None:
            raise RuntimeError("end_turn without begin_turn")
        user_text, prompt_text, prompt_tokens = self._pending
        self._pending = None
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer_text}]
        self._context.remember(prompt_text, prompt_tokens, answer_text, list(answer_tokens))
        record = self._record("assistant", answer_text, finish_reason=finish)
        if stats is not None:
            record["stats"] = stats
        self.log.append(record)
        return record

    def failed_answer(self, answer_text: str, reason: str) -> dict:
        """The record of an answer cut off by a failure that ends the process (an RPC server lost): what was
        generated, for the transcript. The conversation itself is not continued."""
        record = self._record("assistant", answer_text, finish_reason=FINISH_ERROR, error=reason)
        self.log.append(record)
        return record

    def abort_turn(self) -> None:
        """The answer never started (an error before generation): forget the user message."""
        if self._pending is not None:
            self._pending = None
            if self.log and self.log[-1]["role"] == "user":
                self.log.pop()

    # ---- internals ------------------------------------------------------------------------------------
    def _too_long(self, n: int, at_least: bool = False):
        n_ctx = self.model.n_ctx
        raise PromptError(
            f"this message needs {'at least ' if at_least else ''}{n} tokens"
            f"{' with the system prompt' if self.system else ''}, but the context holds {n_ctx}",
            hint="send a shorter message or raise --ctx-size",
        )

    def _check_system(self, text: str | None) -> None:
        """A system prompt stays in every turn: it must leave at least a quarter of the context for the
        conversation, or every message after it would fail."""
        if not text:
            return
        n_ctx = self.model.n_ctx
        if min_tokens(self.model, text) > n_ctx - n_ctx // 4:
            n = min_tokens(self.model, text)
        else:
            r = self.template.render([{"role": "system", "content": text}, {"role": "user", "content": ""}])
            n = len(tokenize_prompt(self.model, r.text, r.protect))
        if n > n_ctx - n_ctx // 4:
            raise PromptError(
                f"the system prompt needs {n} tokens, more than {n_ctx - n_ctx // 4} of the context's {n_ctx} "
                "(the rest must hold the conversation)",
                hint="shorten it or raise --ctx-size",
            )

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def _record(self, role: str, content: str, **extra) -> dict:
        return {"role": role, "content": content, **extra, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _start_log(self) -> None:
        if self.system:
            self.log.append(self._record("system", self.system))


class Transcript:
    """--transcript FILE: one JSON object per line, appended and flushed the moment a message is
    complete, so a crash or a killed terminal loses nothing already said. A write that fails (a full disk)
    stops the transcript, not the chat: `error` then says so."""

    def __init__(self, path: str | Path):
        self._f = open_append(path, "--transcript", make_dirs=True)
        self.path = Path(path).expanduser()  # UsageError before the models load
        self.error: str | None = None

    def write(self, record: dict) -> bool:
        """False once the transcript has stopped (this write failed, or an earlier one)."""
        if self._f is None:
            return False
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._f.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            # One write of the whole line, unbuffered, so a failure cannot leave half a line in Python's buffer.
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, end)  # no half-written record: the file stays valid JSON lines
            except OSError:
                pass
            self.error = (f"the transcript {self.path} stopped: {e.strerror or e}; "
                          "the messages from here on are not in it (/save FILE writes them all elsewhere)")
            self.close()
            return False
        return True

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def save_records(path: str | Path, records: list[dict]) -> Path:
    """Write a whole conversation as JSON lines (the transcript's format), replacing the file atomically
    (only ever a regular file; a symlink's target). OutputError when it cannot."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), make_dirs=True)
