"""`dspark chat`: parse the options, load the pair, run a chat session (chat/session.py holds the logic)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..chat.session import run_chat
from ..console import closed_at_start
from ..engine.loop import DEFAULT_DRAFT_MAX, check_limits
from ..engine.sampling import SamplingParams
from ..errors import UsageError
from ..loader import ModelOptions
from ..prompt import clean_text
from . import _options as o

def register(app: typer.Typer) -> None:
    @app.command("chat")
    @o.shared_options(sampling=o.READING_SAMPLING)
    def chat(
        models: ModelOptions,
        sampling: SamplingParams,
        draft_max: o.DraftMax = DEFAULT_DRAFT_MAX,
        draft_fixed: o.DraftFixed = False,
        seed: o.Seed = None,
        max_tokens: o.MaxTokens = 1024,
        system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (also /system in the chat).")] = None,
        transcript: Annotated[Optional[str], typer.Option("--transcript", help="Append every message to this file as JSON lines, as soon as it is complete.")] = None,
        highlight: Annotated[bool, typer.Option("--highlight", help="Colour the tokens that came from the draft.")] = False,
    ) -> None:
        """Chat with the model, multi-turn; each turn processes only its new tokens. /help inside.

        On a terminal: live tokens/s under the answer; leave with /exit, Ctrl-D or Ctrl-C twice (exit 0). With stdin piped: one message per line, answers only on stdout, stats on stderr (Ctrl-C exits 130)."""
        check_limits(max_tokens, draft_max)
        if "stdin" in closed_at_start:
            raise UsageError("standard input is closed: chat reads your messages from it",
                             hint="type them at a terminal, or pipe them in, one per line")
        system = clean_text(system) if system is not None else None
        interactive = sys.stdin.isatty()
        code = run_chat(models, sampling, system=system, transcript=transcript, highlight=highlight,
                        max_tokens=max_tokens, draft_max=draft_max, fixed=draft_fixed, interactive=interactive)
        if code:
            raise typer.Exit(code)
