"""A chat session: the loop of `dspark chat` (read a message or a /command, answer it speculatively, show it,
record it), with the KV caches reused across turns. commands/chat.py parses the flags and starts one.

Ctrl-C: while the prompt is processed it stops at once (after the current llama.cpp batch); while the
answer streams it stops at the next token, a second one at once. Either way the partial answer stays on
screen and goes to the transcript marked "interrupted", and the chat returns to the prompt. At the prompt,
Ctrl-C clears a typed line; at an empty prompt it warns, and the next one leaves (not within MASH_S of
the Ctrl-C that stopped an answer, so hitting it twice to stop an answer does not also leave).

Exit codes: 0 for /exit, Ctrl-D, end of piped input and the second Ctrl-C at the prompt (leaving a chat
that way is the normal way out, not a failure); 130 for Ctrl-C when stdin is piped (a script was cut off).
A piped chat in which a message failed (too long for the context, say) exits with that error's code, and
a chat whose --transcript stopped (a full disk) with 8, after the conversation went on without it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import closing, contextmanager

from .. import signals
from ..api import open_pair
from ..engine.sampling import SamplingParams
from ..engine.stats import GenerationStats
from ..errors import DsparkError, OutputError, PromptError, UsageError
from ..llama.backend import abort_hook
from ..loader import ModelOptions
from ..views import Screen
from ..engine.stats import FINISH_INTERRUPTED
from .conversation import Conversation, SessionTotals, Transcript, save_records
from .input import PipeInput, TerminalInput, history_path

MASH_S = 0.5  # a Ctrl-C at the prompt this soon after one that stopped an answer does not exit
COMMANDS = ["/help", "/reset", "/stats", "/system", "/save", "/save!", "/exit"]
HELP = """\
/help          this list
/reset         start a new conversation (the system prompt stays)
/stats         session totals: speed, acceptance, prompt tokens processed vs reused
/system TEXT   set the system prompt (/system alone shows it); the next turn re-processes the context
/save FILE     write the whole conversation to FILE as JSON lines (a new file; /save! FILE replaces one)
/exit          leave (also Ctrl-D, or Ctrl-C twice at the prompt)
At a terminal, a line ending in \\ continues on the next line and a pasted block is one message (piped
input: one message per line); //text sends /text.
Ctrl-C stops an answer and keeps what was printed."""


def _turn_stats(stats: GenerationStats) -> dict:
    return {
        "engine": stats.engine,
        "tokens": stats.n_generated,
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "tokens_per_step": round(stats.tokens_per_step, 3),
        "prompt_tokens": stats.n_prompt,
        "prompt_evaluated": stats.n_prompt_evaluated,
        "prompt_evaluated_draft": stats.n_prompt_evaluated_draft,
        "prompt_seconds": round(stats.t_prompt, 4),
    }


class ChatSession:
    def __init__(self, loaded, screen: Screen, reader, *, conversation: Conversation, transcript: Transcript | None,
                 params, max_tokens: int, draft_max: int, interactive: bool, fixed: bool = False):
        self.loaded = loaded
        self._settler: threading.Thread | None = None  # the last answer's settling, while the user types
        self.screen = screen
        self.reader = reader
        self.conv = conversation
        self.transcript = transcript
        self.params = params
        self.max_tokens = max_tokens
        self.draft_max = draft_max
        self.fixed = fixed
        self.interactive = interactive
        self.drafter = loaded.drafter
        self.totals = SessionTotals()
        # Piped chats are scripts: the first message that failed decides the exit code (0 if none did).
        self.failure: DsparkError | None = None

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        armed_at = None  # when the last Ctrl-C was (answer or prompt): one more at an empty prompt leaves
        grace = 0.0  # after one that stopped an answer, MASH_S: keys hit twice to stop it must not also leave
        while True:
            try:
                message = self.reader.read()
            except KeyboardInterrupt:
                if not self.interactive or signals.received is not None:
                    return signals.exit_code()
                typed = self.reader.line_buffer()
                now = time.monotonic()
                self._newline()
                if armed_at is not None and not typed and now - armed_at > grace:
                    return 0
                armed_at, grace = (None if typed else now), 0.0
                if not typed:
                    self.screen.note("(Ctrl-C again to leave, or /exit)")
                continue
            if message is None:  # Ctrl-D or end of piped input
                if self.interactive:
                    self._newline()
                return 0
            armed_at = None
            if not message.strip():
                continue
            if message.startswith("/") and not message.startswith("//"):
                if self.command(message) == "exit":
                    return 0
                continue
            if message.startswith("//"):
                message = message[1:]
            if self.answer(message) == FINISH_INTERRUPTED:
                if not self.interactive or signals.received is not None:  # SIGTERM/SIGHUP: the answer is saved; leave
                    return signals.exit_code()
                armed_at, grace = time.monotonic(), MASH_S

    def _newline(self) -> None:
        if self.screen.live:
            self.screen.out.print()

    def _log(self, record: dict) -> None:
        t = self.transcript
        if t is not None and not t.write(record) and t.error:
            self._fail(OutputError(t.error))
            t.error = None  # said once; the chat goes on without it

    def _fail(self, e: DsparkError) -> None:
        self.screen.error(e.message + (f" ({e.hint})" if e.hint else ""))
        if self.failure is None:
            self.failure = e

    # ---- one answer -----------------------------------------------------------------------------------
    # Long: one answer from prompt to transcript, with its Ctrl-C and failure paths side by side (they share the
    # view and the conversation's pending turn).
    def answer(self, message: str) -> str | None:
        target = self.loaded.target
        if self._settler is not None:
            self._settler.join()  # the cache is the last answer's, settled (see _settle_while_idle)
            self._settler = None
        try:
            # Room for a whole answer, but never more than half the context: a large --max-tokens must not
            # make every turn drop history.
            turn = self.conv.begin_turn(message, reserve=min(self.max_tokens, target.n_ctx // 2))
        except PromptError as e:
            self._fail(e)
            return None
        self._log(self.conv.log[-1])
        if turn.dropped_turns:
            self.totals.dropped_turns += turn.dropped_turns
            what = "the oldest turn" if turn.dropped_turns == 1 else f"the {turn.dropped_turns} oldest turns"
            self.screen.note(f"context full ({target.n_ctx} tokens): dropped {what} (the system prompt stays); "
                             f"re-processing the remaining {len(turn.tokens)} tokens once", style="yellow")

        cached = target.prompt_plan(turn.tokens[:-1])[0]  # what the target's cache keeps (a fresh run's keys)
        view = self.screen.answer_view(len(turn.tokens) - cached)
        tokens: list[int] = []
        pieces: list[str] = []
        stats = None
        finish = None
        events = self.loaded.generate_tokens(turn.tokens, params=self.params,
                          max_tokens=self.max_tokens, draft_max=self.draft_max, fixed=self.fixed)
        view.start()

        def keep_answer(reason: str) -> None:  # llama.cpp is ending the process (model.abort_hook)
            self.screen.out.print()
            self._log(self.conv.failed_answer("".join(pieces), reason))

        with _soft_interrupt() as ctrl_c, abort_hook(keep_answer):
            try:
                with closing(events):  # closing: the engine's finally trims both caches
                    for ev in events:
                        ctrl_c.raise_after = 1
                        stats = ev.stats
                        if ev.token is not None:
                            tokens.append(ev.token)
                        if ev.text:
                            pieces.append(ev.text)
                        view.add(ev.text, ev.from_draft, ev.stats)
                        if ev.finish_reason is not None:
                            finish = ev.finish_reason
                        elif ctrl_c.hits:
                            finish = FINISH_INTERRUPTED
                            break
            except KeyboardInterrupt:  # Model keeps its token list and KV cache in step even then
                finish = FINISH_INTERRUPTED
            except DsparkError as e:
                ctrl_c.raise_after = None
                view.finish(None, None)
                self.conv.abort_turn()
                if not self.interactive:
                    raise
                self._fail(e)
                return None
            except BaseException:
                view.finish(None, None)
                self.conv.abort_turn()
                raise
            # From here on a Ctrl-C only counts: the answer, however it ended, must reach the transcript.
            ctrl_c.raise_after = None
            if stats is None:  # stopped while the prompt was processed
                stats = GenerationStats(method=self.drafter.name if self.drafter else "target", n_prompt=len(turn.tokens))
            if stats.t_end is None:  # interrupted: freeze the clock for tokens/s
                stats.t_end = time.perf_counter()
            view.finish(stats, finish)
            record = self.conv.end_turn("".join(pieces), tokens, finish, stats=_turn_stats(stats))
            self._log(record)
            self.totals.add(stats, finish)
            if finish == "context":
                self.screen.note("the context is full; the next message drops the oldest turns", style="yellow")
        if finish != FINISH_INTERRUPTED:
            self._settle_while_idle()
        return finish

    def _settle_while_idle(self) -> None:
        """While the user reads and types, the target re-processes this answer's tokens as a prompt batch
        (Pair.settle): the next turn then processes only its own tokens and still gets exactly a fresh run's
        answer. The pair's locks make the next answer wait for it, if it comes first."""

        def settle() -> None:
            try:
                self.loaded.settle()
            except BaseException:  # noqa: BLE001 - a cache left unsettled only costs the next turn its reuse
                pass

        self._settler = threading.Thread(target=settle, name="dspark-settle", daemon=True)
        self._settler.start()

    # ---- /commands ------------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name in ("/help", "/?"):
            self.screen.block(HELP)
        elif name == "/reset":
            self.conv.reset()
            self._log({"event": "reset"})
            self.screen.note("new conversation" + (" (system prompt kept)" if self.conv.system else ""))
        elif name == "/stats":
            self.screen.block(self.stats_text())
        elif name == "/system":
            if not arg:
                self.screen.note(f"system prompt: {self.conv.system!r}" if self.conv.system else "no system prompt (the template's default applies)")
            else:
                try:
                    self.conv.set_system(arg)
                except PromptError as e:
                    self._fail(e)
                    return None
                self._log(self.conv.log[-1])
                self.screen.note("system prompt set" + ("; the next turn re-processes the conversation" if self.conv.messages else ""))
        elif name in ("/save", "/save!"):
            if not arg:
                self._fail(UsageError(f"usage: {name} FILE"))
            elif name == "/save" and os.path.lexists(os.path.expanduser(arg)):
                self._fail(UsageError(f"{arg} exists: /save! {arg} replaces it, or name a new file"))
            else:
                try:
                    path = save_records(arg, self.conv.log)
                except DsparkError as e:
                    self._fail(e)
                else:
                    n = sum(r.get("role") in ("user", "assistant") for r in self.conv.log)
                    lines = len(self.conv.log)  # the system prompt's records too
                    self.screen.note(f"saved {n} messages to {path}"
                                     + (f" ({lines} lines, the system prompt's included)" if lines != n else ""))
        else:
            self._fail(UsageError(f"unknown command {name}; /help lists them (//text sends a message starting with /)"))
        return None

    def stats_text(self) -> str:
        t = self.totals
        n_ctx = self.loaded.target.n_ctx
        lines = [
            f"turns: {t.turns}" + (f" ({t.interrupted} interrupted)" if t.interrupted else "") + f", in context now: {self.conv.n_turns}",
            f"generated: {t.n_generated} tokens in {t.t_generation:.2f}s, {t.tokens_per_second:.1f} tok/s",
        ]
        if self.drafter is not None:
            lines.append(f"drafting ({self.drafter.name}): acceptance {t.acceptance_rate:.1%} ({t.n_accepted}/{t.n_drafted}), "
                         f"{t.tokens_per_step:.2f} tokens/step")
        else:
            lines.append("drafting: none (target alone)")
        lines.append(f"exact: {self.loaded.exact_label}")
        reuse = f"prompt: {t.n_prompt} tokens over all turns, target processed {t.n_prompt_evaluated}"
        if self.loaded.draft_model is not None:
            reuse += f", draft processed {t.n_prompt_evaluated_draft}"
        lines.append(reuse + f", in {t.t_prompt:.2f}s")
        lines.append(f"context: {len(self.loaded.target.cached)} of {n_ctx} tokens in the target's KV cache" + (f"; {t.dropped_turns} turns dropped" if t.dropped_turns else ""))
        return "\n".join(lines)


class _CtrlC:
    hits = 0
    # A Ctrl-C beyond this many raises KeyboardInterrupt at once: 0 while the prompt is processed (nothing
    # streams yet, and a long prompt is many seconds of batches), 1 once tokens stream (the first only
    # stops at the next token, the second is the emergency exit), None once generation is over.
    raise_after: int | None = 0


@contextmanager
def _soft_interrupt():
    """While an answer streams, the first Ctrl-C only sets a flag that the loop checks after each token,
    so generation stops between tokens with the models' caches in a known state. See _CtrlC for when one
    raises instead (Python runs the handler between llama.cpp calls, so a raise lands after a batch)."""
    state = _CtrlC()

    def on_sigint(signum, frame):
        state.hits += 1
        if state.raise_after is not None and state.hits > state.raise_after:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (embedded use): plain KeyboardInterrupt semantics
        yield state
        return
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(opts: ModelOptions, params: SamplingParams, *, system: str | None, transcript: str | None, highlight: bool,
             max_tokens: int, draft_max: int, fixed: bool, interactive: bool) -> int:
    """Load the pair and chat until the user leaves; the exit code (see the module docstring)."""
    screen = Screen(live=interactive and sys.stdout.isatty(), highlight=highlight)
    log = Transcript(transcript) if transcript is not None else None  # a bad path fails before the models load

    try:
        loaded = open_pair(opts)
    except BaseException:
        if log is not None:
            log.close()
        raise
    reader = TerminalInput(COMMANDS, history_path()) if interactive else PipeInput()
    try:
        conv = Conversation(loaded.target, system)
        if log is not None and conv.log:
            log.write(conv.log[0])  # the system prompt in force
        if conv.template.is_fallback:
            screen.note("the target has no chat template; using ChatML", style="yellow")
        if interactive:
            names = loaded.target_path.name + (f" + draft {loaded.draft_path.name}" if loaded.draft_path else
                                               f" ({loaded.drafter.name})" if loaded.drafter else " alone")
            # Sampled by default: the seed repeats the whole chat (each turn draws from its own positions' noise).
            sampling = (f"temperature {params.temperature:g}, seed {params.seed}" if params.temperature > 0
                        else "greedy")
            screen.note(f"dspark chat · {names} · context {loaded.target.n_ctx} tokens · {sampling} · "
                        "/help for commands, Ctrl-D to leave")
        session = ChatSession(loaded, screen, reader, conversation=conv, transcript=log, params=params,
                              max_tokens=max_tokens, draft_max=draft_max, interactive=interactive, fixed=fixed)
        code = session.run()
        # Already said when it happened: a piped chat (a script) exits with the first failure's code, and
        # any chat whose transcript stopped with 8 (it is incomplete).
        if not code and session.failure is not None and (not interactive or isinstance(session.failure, OutputError)):
            code = session.failure.exit_code
    finally:
        reader.save_history()
        if log is not None:
            log.close()
        loaded.close()
    return code
