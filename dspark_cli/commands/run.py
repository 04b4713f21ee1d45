"""`dspark run [PROMPT]`: one answer, streamed to stdout; a one-line summary on stderr."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from .. import signals
from ..console import closed_at_start, quiet_stdout, say, write, write_json
from ..api import open_pair
from ..engine.drafters import METHOD_TARGET
from ..engine.loop import DEFAULT_DRAFT_MAX, check_limits
from ..errors import PromptError, UsageError
from ..loader import ModelOptions
from ..engine.sampling import SamplingParams
from ..prompt import clean_text
from . import _options as o


MAX_STDIN = 64 << 20  # bytes: about 16 million tokens, past any model's context


def read_prompt(argument: str | None) -> str:
    """The argument, stdin, or both: piped text is appended to the argument (`cat f | dspark run "Sum:"`)."""
    stdin = sys.stdin
    piped = ""
    if argument == "-" or not stdin.isatty():
        data = stdin.buffer.read(MAX_STDIN + 1)
        if len(data) > MAX_STDIN:  # `yes | dspark run` would otherwise fill the memory
            raise PromptError(f"standard input holds more than {MAX_STDIN >> 20} MiB: longer than any context",
                              hint="pass a part of it, or summarize it in pieces")
        piped = data.decode("utf-8", errors="replace")
        if argument == "-":
            argument = None
    elif argument is None:
        raise PromptError("no prompt: pass it as an argument or pipe it on stdin", hint='dspark run "Why is the sky blue?"')
    parts = [p for p in (argument and clean_text(argument), piped) if p and p.strip()]
    if not parts:
        if argument is not None:
            raise PromptError("the prompt is empty")
        why = ("standard input is closed" if "stdin" in closed_at_start else "nothing arrived on stdin" if not piped
               else "stdin held only whitespace")
        raise PromptError(f"the prompt is empty ({why})", hint='pass it as an argument: dspark run "Why is the sky blue?"')
    return "\n\n".join(p.rstrip("\n") for p in parts)


REPEATED_SHARE = 0.5  # an answer more than half made of what was already written (see repeated_share)


def repeated_share(answer: str, prompt: str, n: int = 4) -> float:
    """The share of the answer's words that end a run of n words already written before them (in the prompt or
    earlier in the answer): a repetition loop, or text copied from the prompt. Drafts are accepted easily there,
    so the speed of such a run says little about a typical one."""
    seen_words = prompt.split()
    words = answer.split()
    if len(words) < 2 * n:
        return 0.0
    seen = {tuple(seen_words[i : i + n]) for i in range(len(seen_words) - n + 1)}
    every = seen_words[-(n - 1):] + words
    repeated = 0
    for i in range(n - 1, len(every)):
        gram = tuple(every[i - n + 1 : i + 1])
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(words)


def _summary(stats, finish: str | None, *, seed: int | None = None, repeated: float = 0.0) -> str:
    s = stats
    line = f"{s.n_generated} tokens, {s.tokens_per_second:.1f} tok/s"
    if s.method != METHOD_TARGET:
        acceptance = f"{s.acceptance_rate:.1%}" if s.n_drafted else "n/a (nothing drafted)"
        line += f", acceptance {acceptance}, {s.tokens_per_step:.2f} tokens/step ({s.method})"
    else:
        line += " (target alone)"
    line += f"; prompt {s.n_prompt} tokens in {s.t_prompt:.2f}s; finish: {finish}"
    if seed is not None:  # sampled: the seed that repeats this answer exactly
        line += f"; seed {seed}"
    if s.exact.startswith("no"):  # said only when it is not proven (the proof at load, llama/proof.py)
        line += "; not proven exact here"
    if repeated > REPEATED_SHARE and s.n_drafted:
        line += (f"\n  (note: {repeated:.0%} of this answer repeats text already written, which drafts predict easily: "
                 "not a typical speed; `dspark bench` measures that)")
    return line


def register(app: typer.Typer) -> None:
    @app.command("run")
    @o.shared_options(sampling=o.READING_SAMPLING)
    def run(
        models: ModelOptions,
        sampling: SamplingParams,
        prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' reads stdin. Piped stdin is appended to it.", show_default=False)] = None,
        draft_max: o.DraftMax = DEFAULT_DRAFT_MAX,
        draft_fixed: o.DraftFixed = False,
        seed: o.Seed = None,
        max_tokens: o.MaxTokens = 512,
        raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the target's chat template.")] = False,
        system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (chat template only).")] = None,
        stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this string appears (repeatable).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text and stats) instead of streaming.")] = False,
    ) -> None:
        """Answer one prompt, speculatively: text to stdout, a summary line to stderr."""
        # Every check on flags and input happens before a model is loaded.
        check_limits(max_tokens, draft_max)
        if raw and system:
            raise UsageError("--system needs the chat template; drop --raw or drop --system")
        system = clean_text(system) if system is not None else None
        stop = [clean_text(s) for s in stop or ()]
        params = sampling
        text_in = read_prompt(prompt)

        with open_pair(models) as loaded:
            if not raw and loaded.template.is_fallback:
                say("the target has no chat template; using ChatML")
            events = loaded.generate(text_in, raw=raw, system=system, max_tokens=max_tokens, stop=stop,
                                     draft_max=draft_max, fixed=draft_fixed, temperature=params.temperature,
                                     top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, seed=params.seed)
            try:
                _stream(loaded, events, params, as_json, text_in)
            except BrokenPipeError:
                quiet_stdout()  # the reader went away (`| head`): stop generating, say nothing, exit 0
            finally:
                events.close()  # before the models are freed: it trims their caches


def _view(as_json: bool):
    """How the answer is shown. The live status line needs stderr on a terminal that can redraw (not with
    --json, NO_COLOR or TERM=dumb); when stdout is that terminal too, the line sits under the streaming text."""
    if as_json or not sys.stderr.isatty() or os.environ.get("TERM") == "dumb" or "NO_COLOR" in os.environ:
        return None
    from ..views import LiveAnswer, Screen, StatusLine

    if sys.stdout.isatty():
        return LiveAnswer(Screen(live=True, highlight=False), None)
    return StatusLine()


def _stream(models, events, params, as_json, prompt_text: str = "") -> None:
    pieces: list[str] = []
    stats = None
    finish = None
    view = _view(as_json)
    if view is not None:
        view.start()
    try:
        for ev in events:
            stats = ev.stats
            if ev.text:
                pieces.append(ev.text)
            if view is not None:
                view.add(ev.text, ev.from_draft, ev.stats)
            elif ev.text and not as_json:
                write(ev.text)
            if ev.finish_reason is not None:
                finish = ev.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
        if view is not None:
            view.finish(None, None)
        if as_json and stats is not None:
            _print_json(pieces, stats, finish, params, models)
        elif pieces and view is None:
            write("\n")
        n = stats.n_generated if stats is not None else 0
        say(f"interrupted after {n} tokens")
        raise SystemExit(signals.exit_code())
    if view is not None:
        view.finish(None, None)  # the status line goes; the summary below goes to stderr
    if as_json:
        _print_json(pieces, stats, finish, params, models)
    else:
        if view is None and pieces and not pieces[-1].endswith("\n"):
            write("\n")
        if stats.speculation_note:
            say(stats.speculation_note)
        say(_summary(stats, finish, seed=params.seed if params.temperature > 0 else None,
                     repeated=repeated_share("".join(pieces), prompt_text)))


def _print_json(pieces, stats, finish, params, models) -> None:
    record = {
        "text": "".join(pieces),
        "finish_reason": finish,
        **stats.as_dict(),
        "target": str(models.target_path),
        "draft": str(models.draft_path) if models.draft_path else (models.drafter.name if models.drafter else None),
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "seed": params.seed,
    }
    write_json(record)
