"""`dspark bench`: the target alone against speculative decoding on the same prompts, side by side. The
measuring, the figures and their rendering live in dspark_cli/bench/; this module parses options."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..bench.prompts import SUITES, builtin_prompts, load_prompts
from ..bench.render import render
from ..bench.report import build_report, to_csv, to_json
from ..bench.runner import BenchConfig, run_bench
from ..engine.drafters import METHOD_DRAFT, METHOD_HYBRID, METHOD_LOOKUP, METHODS, WITH_MEMORY, split_method
from ..bench.setup import setup_info
from ..bench.stats import CONTROL, summarize
from ..console import console, say, write
from ..engine.loop import DEFAULT_DRAFT_MAX, check_limits
from ..errors import DsparkError, OutputError, UsageError
from ..files import check_writable, save_fallback, write_atomic
from ..loader import DRAFT_LOOKUP, DRAFT_NONE, ModelOptions, load
from ..engine.sampling import SamplingParams
from . import _options as o


def _int_list(text: str, flag: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"{flag} takes numbers separated by commas (like 2,4,8), got {text!r}") from None
        if n < 1:
            raise UsageError(f"{flag} must be at least 1, got {n}")
        if n not in out:
            out.append(n)
    return out


def _methods(text: str | None, draft_flag: str | None, target: str | None, pair: str | None,
             memory_mb: int = 1) -> list[str]:
    # As in the loader: a draft model comes from --draft PATH, a --pair, or the demo pair (no --target).
    has_model = draft_flag not in (DRAFT_NONE, DRAFT_LOOKUP) and (draft_flag is not None or target is None or bool(pair))
    if text is None:
        if not has_model and draft_flag is None:
            say("no draft model named: comparing prompt lookup (pass --draft PATH for a draft model)")
        return [METHOD_HYBRID] if has_model else [METHOD_LOOKUP]
    out = []
    for name in (p.strip().lower() for p in text.split(",") if p.strip()):
        m, with_memory = split_method(name)
        if m not in METHODS + (CONTROL,) or (m == CONTROL and with_memory):
            raise UsageError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}, each may take "
                             f"{WITH_MEMORY} (the target alone always runs), or {CONTROL}")
        if with_memory and not memory_mb:
            raise UsageError(f"--methods {name}: the drafting memory is off (--draft-memory 0)")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("--methods is empty; choose from " + ", ".join(METHODS))
    for m in (split_method(name)[0] for name in out):
        if m in (METHOD_HYBRID, METHOD_DRAFT) and not has_model:
            raise UsageError(f"--methods {m} needs a draft model: " + (f"--draft is {draft_flag!r}" if draft_flag else "pass --draft PATH"))
    return out


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @o.shared_options
    def bench(
        models: ModelOptions,
        sampling: SamplingParams,
        methods: Annotated[Optional[str], typer.Option("--methods", help="What to compare with the target alone, comma-separated: hybrid (the draft model and prompt lookup, what `run` uses), draft (the model alone), lookup; each may take +memory (hybrid+memory: drafting from the answers to the prompts before it in the same repeat too, as chat, serve and the API do); control (the target alone again, a variant of its own: its spread over the rounds is the machine's noise, shown beside each prompt's). Default: hybrid (lookup with --draft lookup).", rich_help_panel=o.MODELS)] = None,
        draft_max: Annotated[str, typer.Option("--draft-max", help="Most tokens drafted per step, or several to sweep (2,4,8,16); the best is marked and measured again.", rich_help_panel=o.MODELS)] = str(DEFAULT_DRAFT_MAX),
        draft_fixed: o.DraftFixed = False,
        prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="Prompts file: JSON lines (Spec-Bench / MT-Bench: question_id, category, turns; first turn used) or plain text, one prompt per line. Default: the built-in suite.", show_default=False)] = None,
        suite_name: Annotated[Optional[str], typer.Option("--suite", help="A built-in suite: standard (the default: chat, code, summaries, edits...) or repetitive (ten requests for a JSON record of one schema, in order: where the drafting memory pays; compare --methods hybrid,hybrid+memory).", show_default=False)] = None,
        repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed runs per prompt and method; medians are reported.")] = 3,
        warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="One untimed run of each method first.")] = True,
        seed: Annotated[int, typer.Option("--seed", help="Random seed, the same for every method and run.", rich_help_panel=o.SAMPLING)] = 0,
        max_tokens: o.MaxTokens = 128,
        raw: Annotated[bool, typer.Option("--raw", help="Send prompts as they are, without the target's chat template.")] = False,
        json_path: Annotated[Optional[str], typer.Option("--json", help="Write every figure as JSON to this file ('-': stdout, and the table goes to stderr).", show_default=False)] = None,
        csv_path: Annotated[Optional[str], typer.Option("--csv", help="Write the per-prompt rows as CSV to this file.", show_default=False)] = None,
        calibrate: Annotated[bool, typer.Option("--calibrate", help="Start this pair's cost profile (what every run's cost model starts from) afresh: time every verify size and the draft model first, then learn acceptance from the bench's runs.")] = False,
    ) -> None:
        """Measure the speedup: the target alone vs speculative decoding, interleaved, medians of repeats."""
        # Every check on flags and input happens before a model is loaded.
        lengths = _int_list(draft_max, "--draft-max")
        chosen = _methods(methods, models.draft, models.target, models.pair, models.memory_mb)
        if suite_name is not None and suite_name not in SUITES:
            raise UsageError(f"--suite: unknown suite {suite_name!r}; choose from {', '.join(SUITES)}")
        if suite_name is not None and prompts is not None:
            raise UsageError("--suite and --prompts both name the prompts: pass one")
        if repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {repeats}")
        check_limits(max_tokens)
        for flag, path in (("--json", json_path), ("--csv", csv_path)):
            if path is not None:
                check_writable(path, flag)
        if csv_path == "-" and json_path == "-":
            raise UsageError("--json - and --csv - cannot both go to stdout")
        if json_path and csv_path and json_path != "-" and Path(json_path).expanduser().resolve() == Path(csv_path).expanduser().resolve():
            raise UsageError(f"--json and --csv name the same file ({json_path}): one would overwrite the other")
        suite = load_prompts(prompts) if prompts is not None else builtin_prompts(suite_name or "standard")
        params = sampling
        opts = models
        if all(split_method(m)[0] == METHOD_LOOKUP for m in chosen) and opts.draft is None:
            opts = replace(opts, draft=DRAFT_LOOKUP)  # prompt lookup alone: do not load a draft model nobody uses
        if opts.draft == DRAFT_NONE and methods is None:
            say("--draft none: comparing prompt lookup with the target alone (it needs no draft model)")
        config = BenchConfig(prompts=suite, methods=chosen, draft_max=lengths, repeats=repeats, warmup=warmup,
                             max_tokens=max_tokens, params=params, raw=raw, fixed=draft_fixed)

        t0 = time.perf_counter()
        loaded = load(opts)
        load_seconds = time.perf_counter() - t0
        try:
            setup = setup_info(loaded, opts, load_seconds)
            if calibrate:
                _calibrate(loaded, max(lengths))
            run = _run_with_progress(loaded, config, opts.draft_p_min, opts.memory_mb)
        finally:
            loaded.close()

        summary = summarize(run.records, [p.id for p in suite])
        report = build_report(run, summary, config, setup)
        # The table first: a results file that cannot be written must not cost the results on screen.
        render(report, to_stderr=json_path == "-" or csv_path == "-")
        errors = [e for e in (_save(json_path, to_json, report, ".json"), _save(csv_path, to_csv, report, ".csv")) if e]
        mismatches = report["mismatches"]
        if mismatches:
            # Any difference fails: dspark's own CPU build is batch-invariant, so even a near-tie should agree.
            n = len(mismatches)
            ties = all(m["near_tie"] for m in mismatches)
            errors.insert(0, DsparkError(
                f"{n} speculative output{'s' if n != 1 else ''} differed from the target alone at temperature 0"
                + (" (all at floating-point near-ties)" if ties else ": speculation was not lossless"),
                hint=("this llama.cpp build is not batch-invariant (a GPU backend, or CPU kernels built with "
                      "DSPARK_FAST_KERNELS=1 / llamafile sgemm): a 1-token and a multi-token batch round differently")
                if ties else None,
            ))
        for e in errors[1:]:  # the first is the exit's own line
            say(f"error: {e.message}")
        if errors:
            raise errors[0]


def _calibrate(loaded, width: int) -> None:
    from ..bench.runner import calibrate, calibration_plan

    if loaded.profile is None:
        say("--calibrate: no cost profile to calibrate (the target alone drafts nothing)")
        return
    tokens, width = calibration_plan(loaded, width)
    say(f"calibrating: timing target steps of 1 to {width + 1} tokens and the draft model")
    calibrate(loaded, tokens, width)
    say(f"cost profile started afresh: {loaded.profile.path}")


def _save(path: str | None, render, report: dict, suffix: str) -> OutputError | None:
    """Write one results file ('-': stdout); on failure the error, with where a copy was saved instead."""
    if path is None:
        return None
    text = render(report)
    if path == "-":
        write(text)
        return None
    try:
        write_atomic(path, text)
    except OutputError as e:
        copy = save_fallback(text, "dspark-bench-", suffix)
        e.message += f"; the results were saved to {copy} instead" if copy else "; the results are only on screen"
        return e
    return None


def _run_with_progress(loaded, config, draft_p_min, memory_mb):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as progress:
        task = progress.add_task("warm-up", total=config.total_runs)

        def on_run(prompt_id: str, variant: str, repeat: int) -> None:
            what = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{config.repeats}"
            progress.update(task, advance=1, description=f"{what} {prompt_id} {variant}")

        return run_bench(loaded, config, draft_p_min=draft_p_min, memory_mb=memory_mb, on_run=on_run)
