"""How an answer shows in the terminal, for `dspark run` and `dspark chat` alike (Rich): status and summary
lines, the streaming answer. Reading a chat's messages is chat/input.py.

Two shapes, chosen once:
- live (stdin and stdout are terminals): the answer streams on the terminal with a status line under it
  (tokens/s, acceptance, tokens per step) that disappears when the answer ends, then a one-line summary;
- plain (anything piped): answers only on stdout, every note and summary on stderr, so
  `printf 'q1\\nq2\\n' | dspark chat > answers.txt` gives just the answers.
"""

from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.text import Text

from .console import console, err_text, say, write
from .engine.stats import FINISH_CONTEXT, FINISH_INTERRUPTED, FINISH_LENGTH
from .engine.drafters import METHOD_TARGET

REFRESH_S = 0.05  # the live view redraws at most this often (every token would flicker and cost CPU)

_FINISH_NOTE = {FINISH_LENGTH: "cut at --max-tokens", FINISH_CONTEXT: "context full", FINISH_INTERRUPTED: "interrupted"}
_FINISH_BRIEF = {FINISH_LENGTH: "cut", FINISH_CONTEXT: "ctx full", FINISH_INTERRUPTED: "interrupted"}


# ---- text of the status and summary lines (pure, so narrow terminals are easy to test) -----------------
def _fit(variants: list[str], width: int) -> str:
    """The most detailed variant that fits the width (the last one, cut, if none does)."""
    for v in variants:
        if len(v) <= width:
            return v
    return variants[-1][: max(width, 1)]


def _speed_parts(stats, long: bool) -> list[str]:
    s = stats
    if s.method == METHOD_TARGET:
        return [f"{s.tokens_per_second:.1f} tok/s", "target alone" if long else ""]
    if long:
        return [f"{s.tokens_per_second:.1f} tok/s", f"acceptance {s.acceptance_rate:.0%}", f"{s.tokens_per_step:.2f} tokens/step"]
    return [f"{s.tokens_per_second:.1f} tok/s", f"acc {s.acceptance_rate:.0%}", f"{s.tokens_per_step:.1f}/step"]


def _join(parts: list[str]) -> str:
    return " · ".join(p for p in parts if p)


def status_line(stats, width: int) -> str:
    """While an answer streams."""
    long, short = _speed_parts(stats, True), _speed_parts(stats, False)
    return _fit(
        [_join(long + [f"{stats.n_generated} tokens", f"{stats.t_generation:.1f}s"]),
         _join(long + [f"{stats.n_generated} tokens"]), _join(short + [f"{stats.n_generated} tok"]), _join(short), short[0]],
        width,
    )


def summary_line(stats, finish: str | None, width: int = 10_000) -> str:
    """After an answer: what it cost, the prompt processing included (new tokens of the prompt's total)."""
    s = stats
    if finish == FINISH_INTERRUPTED and s.n_target_steps == 0 and s.n_generated == 0 and s.t_prompt == 0.0:
        return _fit([f"interrupted while processing the prompt ({s.n_prompt} tokens)", "interrupted"], width)
    note = _FINISH_NOTE.get(finish or "", "")
    brief = _FINISH_BRIEF.get(finish or "", "")
    speed = _speed_parts(s, False)
    prompt = f"prompt {s.n_prompt_evaluated}/{s.n_prompt}"
    return _fit(
        [
            _join([f"{s.n_generated} tokens"] + _speed_parts(s, True)
                  + [f"prompt {s.n_prompt_evaluated} new of {s.n_prompt} tokens in {s.t_prompt:.2f}s", note]),
            _join([f"{s.n_generated} tok"] + speed + [prompt, brief]),
            _join(speed + [prompt]),
            _join(speed + [brief]),
            _join([speed[0], brief]),
        ],
        width,
    )


# ---- output --------------------------------------------------------------------------------------------
class Screen:
    """Where everything is printed. `live` only when both ends are terminals."""

    def __init__(self, *, live: bool, highlight: bool):
        # Rich honours NO_COLOR itself (colours go, bold/dim/underline stay) and reads the terminal's width.
        self.out = console(highlight=False, markup=False, emoji=False, soft_wrap=False)
        # TERM=dumb cannot redraw a status line: stream plainly, summaries on stderr.
        self.live = live and not self.out.is_dumb_terminal
        self.highlight_style = None
        if highlight:
            # Without colour, underline still marks the drafted tokens.
            self.highlight_style = "underline" if self.out.no_color or not self.out.color_system else "green"

    def note(self, text: str, style: str = "dim") -> None:
        if self.live:
            self.out.print(Text(text, style=style))
        else:
            self._err_line(text)

    def error(self, text: str) -> None:
        if self.live:
            self.out.print(Text(f"error: {text}", style="bold red"))
        else:
            self._err_line(f"error: {text}")

    def _err_line(self, text: str) -> None:
        say(text)

    def block(self, text: str) -> None:
        """Multi-line output of a command (/help, /stats)."""
        if self.live:
            self.out.print(Text(text))
        else:
            err_text(text.rstrip("\n") + "\n")

    def answer_view(self, n_new_prompt_tokens: int):
        return LiveAnswer(self, n_new_prompt_tokens) if self.live else PlainAnswer(self)


class PlainAnswer:
    """Answer text straight to stdout as it comes; the summary to stderr."""

    def __init__(self, screen: Screen):
        self.screen = screen
        self._last = ""

    def start(self) -> None:
        pass

    def add(self, text: str, from_draft: bool, stats) -> None:
        if text:
            write(text)
            self._last = text

    def finish(self, stats, finish: str | None) -> None:
        # One answer, one line block: end it with a newline, even an empty answer (unless nothing came at
        # all because generation failed).
        if stats is not None and not self._last.endswith("\n"):
            write("\n")
        if stats is not None:
            self.screen._err_line(summary_line(stats, finish))


class LiveAnswer:
    """The answer streams; below it a status line is redrawn in place. Only the row being written and the
    status line are live; finished rows are printed above them for good, so an answer longer than the
    screen scrolls like any output and what was printed stays when Ctrl-C stops it."""

    def __init__(self, screen: Screen, n_new_prompt_tokens: int | None):
        self.screen = screen
        self.console = screen.out
        self.pending = Text()  # the row being written: never wider than the terminal
        what = "the prompt" if n_new_prompt_tokens is None else f"{n_new_prompt_tokens} prompt tokens"
        self.status = Text(f"processing {what}…", style="dim", no_wrap=True, overflow="ellipsis")
        self._live = Live(console=self.console, auto_refresh=False, transient=True, redirect_stdout=False,
                          redirect_stderr=False, get_renderable=lambda: Group(self.pending, self.status))
        self._drawn = 0.0

    def start(self) -> None:
        self._live.start(refresh=True)

    def add(self, text: str, from_draft: bool, stats) -> None:
        if text:
            self.pending.append(text, style=self.screen.highlight_style if from_draft else None)
            self._commit_rows()
        now = time.perf_counter()
        if now - self._drawn >= REFRESH_S:
            self.status = Text(status_line(stats, self.console.width - 1), style="dim", no_wrap=True, overflow="ellipsis")
            self._live.refresh()
            self._drawn = now

    def _commit_rows(self) -> None:
        # Word wrapping is greedy, so every wrapped row but the last is final whatever comes next.
        if "\n" not in self.pending.plain and self.pending.cell_len < self.console.width:
            return
        rows = self.pending.wrap(self.console, self.console.width)
        if len(rows) > 1:
            for row in rows[:-1]:
                self.console.print(row)
            self.pending = rows[-1]

    def finish(self, stats, finish: str | None) -> None:
        self._live.stop()  # transient: the status line goes
        if self.pending.plain:
            self.console.print(self.pending)
        if stats is not None:
            self.console.print(Text(summary_line(stats, finish, self.console.width - 1), style="dim"))


class StatusLine:
    """`dspark run` with stdout piped and stderr a terminal: the text goes to stdout as it comes, and a status
    line on stderr is redrawn in place, then removed (the summary replaces it)."""

    def __init__(self):
        self.console = console(stderr=True, highlight=False)
        self.status = Text("processing the prompt…", style="dim", no_wrap=True, overflow="ellipsis")
        self._live = Live(console=self.console, auto_refresh=False, transient=True, redirect_stdout=False,
                          redirect_stderr=False, get_renderable=lambda: self.status)
        self._drawn = 0.0

    def start(self) -> None:
        self._live.start(refresh=True)

    def add(self, text: str, from_draft: bool, stats) -> None:
        if text:
            write(text)
        now = time.perf_counter()
        if now - self._drawn >= REFRESH_S:
            self.status = Text(status_line(stats, self.console.width - 1), style="dim", no_wrap=True, overflow="ellipsis")
            self._live.refresh()
            self._drawn = now

    def finish(self, stats, finish: str | None) -> None:
        self._live.stop()


# ---- input ---------------------------------------------------------------------------------------------
