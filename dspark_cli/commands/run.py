"""`dspark run [PROMPT]`: one answer, streamed to stdout; a one-line summary on stderr."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .. import signals
from ..console import closed_at_start, quiet_stdout, say, write, write_json
from ..engine import DEFAULT_DRAFT_MAX, check_limits, generate
from ..errors import PromptError, UsageError
from ..loader import load
from ..prompt import build_prompt, clean_text
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


def _summary(stats, finish: str | None) -> str:
    s = stats
    line = f"{s.n_generated} tokens, {s.tokens_per_second:.1f} tok/s"
    if s.method != "target":
        acceptance = f"{s.acceptance_rate:.1%}" if s.n_drafted else "n/a (nothing drafted)"
        line += f", acceptance {acceptance}, {s.tokens_per_step:.2f} tokens/step ({s.method}, {s.engine})"
    else:
        line += " (target alone)"
    line += f"; prompt {s.n_prompt} tokens in {s.t_prompt:.2f}s; finish: {finish}"
    return line


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' reads stdin. Piped stdin is appended to it.", show_default=False)] = None,
        target: o.Target = None,
        draft: o.Draft = None,
        pair: o.Pair = None,
        draft_max: o.DraftMax = DEFAULT_DRAFT_MAX,
        draft_fixed: o.DraftFixed = False,
        no_lookup: o.NoLookup = False,
        draft_p_min: o.DraftPMin = 0.0,
        temp: o.Temp = 0.0,
        top_k: o.TopK = 0,
        top_p: o.TopP = 1.0,
        min_p: o.MinP = o.MIN_P,
        seed: o.Seed = None,
        max_tokens: o.MaxTokens = 512,
        ctx_size: o.CtxSize = 4096,
        n_gpu_layers: o.GpuLayers = None,
        n_gpu_layers_draft: o.GpuLayersDraft = None,
        threads: o.Threads = None,
        raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the target's chat template.")] = False,
        system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (chat template only).")] = None,
        stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this string appears (repeatable).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text and stats) instead of streaming.")] = False,
        pull: o.Pull = False,
        offline: o.Offline = False,
        force: o.Force = False,
    ) -> None:
        """Answer one prompt, speculatively: text to stdout, a summary line to stderr."""
        # Every check on flags and input happens before a model is loaded.
        check_limits(max_tokens, draft_max)
        if raw and system:
            raise UsageError("--system needs the chat template; drop --raw or drop --system")
        system = clean_text(system) if system is not None else None
        stop = [clean_text(s) for s in stop or ()]
        params = o.sampling_params(temp, top_k, top_p, seed, min_p)
        opts = o.model_options(target, draft, pair, ctx_size, n_gpu_layers, n_gpu_layers_draft, threads, draft_p_min, pull, offline, force,
                               lookup=not no_lookup)
        text_in = read_prompt(prompt)

        loaded = load(opts)
        try:
            tokens, templated = build_prompt(loaded.target, text_in, raw=raw, system=system)
            if not raw and not templated:
                say("the target has no chat template; sending the prompt as is")
            _generate(loaded, tokens, params, max_tokens, draft_max, tuple(stop), as_json, draft_fixed)
        finally:
            loaded.close()


def _generate(loaded, tokens, params, max_tokens, draft_max, stop, as_json, fixed) -> None:
    try:
        _stream(loaded, tokens, params, max_tokens, draft_max, stop, as_json, fixed)
    except BrokenPipeError:
        # The reader went away (`| head`): stop generating, say nothing, exit 0.
        quiet_stdout()


def _stream(loaded, tokens, params, max_tokens, draft_max, stop, as_json, fixed) -> None:
    pieces: list[str] = []
    stats = None
    finish = None
    try:
        for ev in generate(loaded.target, tokens, drafter=loaded.drafter, params=params,
                           max_tokens=max_tokens, draft_max=draft_max, stop=stop, fixed=fixed):
            stats = ev.stats
            if ev.text:
                pieces.append(ev.text)
                if not as_json:
                    write(ev.text)
            if ev.finish_reason is not None:
                finish = ev.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
        if as_json and stats is not None:
            _print_json(pieces, stats, finish, params, loaded)
        elif pieces:
            write("\n")
        n = stats.n_generated if stats is not None else 0
        say(f"interrupted after {n} tokens")
        raise SystemExit(signals.exit_code())
    if as_json:
        _print_json(pieces, stats, finish, params, loaded)
    else:
        if pieces and not pieces[-1].endswith("\n"):
            write("\n")
        if stats.speculation_note:
            say(stats.speculation_note)
        say(_summary(stats, finish))


def _print_json(pieces, stats, finish, params, loaded) -> None:
    record = {
        "text": "".join(pieces),
        "finish_reason": finish,
        **stats.as_dict(),
        "target": str(loaded.target_path),
        "draft": str(loaded.draft_path) if loaded.draft_path else (loaded.drafter.name if loaded.drafter else None),
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "seed": params.seed,
    }
    write_json(record)
