"""`dspark bench`: the target alone against speculative decoding on the same prompts, side by side.
Measurement lives in bench_runner / bench_stats / bench_report; this module parses options and renders."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..bench_prompts import builtin_prompts, load_prompts
from ..bench_report import build_report, to_csv, to_json
from ..bench_runner import METHOD_DRAFT, METHOD_HYBRID, METHOD_LOOKUP, METHODS, BenchConfig, run_bench
from ..bench_setup import setup_info
from ..bench_stats import summarize
from ..console import console, say, write
from ..engine import DEFAULT_DRAFT_MAX, check_limits
from ..errors import DsparkError, OutputError, UsageError
from ..files import check_writable, save_fallback, write_atomic
from ..loader import DRAFT_LOOKUP, DRAFT_NONE, load
from . import _options as o

BAR = 28  # chart width in cells


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


def _methods(text: str | None, draft_flag: str | None, target: str | None, pair: str | None) -> list[str]:
    # As in the loader: a draft model comes from --draft PATH, a --pair, or the demo pair (no --target).
    has_model = draft_flag not in (DRAFT_NONE, DRAFT_LOOKUP) and (draft_flag is not None or target is None or bool(pair))
    if text is None:
        if not has_model and draft_flag is None:
            say("no draft model named: comparing prompt lookup (pass --draft PATH for a draft model)")
        return [METHOD_HYBRID] if has_model else [METHOD_LOOKUP]
    out = []
    for m in (p.strip().lower() for p in text.split(",") if p.strip()):
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)} (the target alone always runs)")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError("--methods is empty; choose from " + ", ".join(METHODS))
    for m in (METHOD_HYBRID, METHOD_DRAFT):
        if m in out and not has_model:
            raise UsageError(f"--methods {m} needs a draft model: " + (f"--draft is {draft_flag!r}" if draft_flag else "pass --draft PATH"))
    return out


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        target: o.Target = None,
        draft: o.Draft = None,
        pair: o.Pair = None,
        methods: Annotated[Optional[str], typer.Option("--methods", help="What to compare with the target alone, comma-separated: hybrid (the draft model and prompt lookup, what `run` uses), draft (the model alone), lookup. Default: hybrid (lookup with --draft lookup).", rich_help_panel=o.MODELS)] = None,
        draft_max: Annotated[str, typer.Option("--draft-max", help="Most tokens drafted per step, or several to sweep (2,4,8,16); the best is marked and measured again.", rich_help_panel=o.MODELS)] = str(DEFAULT_DRAFT_MAX),
        draft_fixed: o.DraftFixed = False,
        draft_p_min: o.DraftPMin = 0.0,
        prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="Prompts file: JSON lines (Spec-Bench / MT-Bench: question_id, category, turns; first turn used) or plain text, one prompt per line. Default: the built-in suite.", show_default=False)] = None,
        repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed runs per prompt and method; medians are reported.")] = 3,
        warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="One untimed run of each method first.")] = True,
        temp: o.Temp = 0.0,
        top_k: o.TopK = 0,
        top_p: o.TopP = 1.0,
        min_p: o.MinP = o.MIN_P,
        seed: Annotated[int, typer.Option("--seed", help="Random seed, the same for every method and run.", rich_help_panel=o.SAMPLING)] = 0,
        max_tokens: o.MaxTokens = 128,
        ctx_size: o.CtxSize = 4096,
        n_gpu_layers: o.GpuLayers = None,
        n_gpu_layers_draft: o.GpuLayersDraft = None,
        threads: o.Threads = None,
        raw: Annotated[bool, typer.Option("--raw", help="Send prompts as they are, without the target's chat template.")] = False,
        json_path: Annotated[Optional[str], typer.Option("--json", help="Write every figure as JSON to this file ('-': stdout, and the table goes to stderr).", show_default=False)] = None,
        csv_path: Annotated[Optional[str], typer.Option("--csv", help="Write the per-prompt rows as CSV to this file.", show_default=False)] = None,
        pull: o.Pull = False,
        offline: o.Offline = False,
        force: o.Force = False,
    ) -> None:
        """Measure the speedup: the target alone vs speculative decoding, interleaved, medians of repeats."""
        # Every check on flags and input happens before a model is loaded.
        lengths = _int_list(draft_max, "--draft-max")
        chosen = _methods(methods, draft, target, pair)
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
        suite = load_prompts(prompts) if prompts is not None else builtin_prompts()
        params = o.sampling_params(temp, top_k, top_p, seed, min_p)
        if chosen == [METHOD_LOOKUP] and draft is None:
            draft = DRAFT_LOOKUP  # prompt lookup alone: do not load a draft model nobody uses
        if draft == DRAFT_NONE and methods is None:
            say("--draft none: comparing prompt lookup with the target alone (it needs no draft model)")
        opts = o.model_options(target, draft, pair, ctx_size, n_gpu_layers, n_gpu_layers_draft, threads, draft_p_min, pull, offline, force)
        config = BenchConfig(prompts=suite, methods=chosen, draft_max=lengths, repeats=repeats, warmup=warmup,
                             max_tokens=max_tokens, params=params, raw=raw, fixed=draft_fixed)

        t0 = time.perf_counter()
        loaded = load(opts)
        load_seconds = time.perf_counter() - t0
        try:
            setup = setup_info(loaded, opts, load_seconds)
            run = _run_with_progress(loaded, config, draft_p_min)
        finally:
            loaded.close()

        summary = summarize(run.records, [p.id for p in suite])
        report = build_report(run, summary, config, setup)
        # The table first: a results file that cannot be written must not cost the results on screen.
        _render(report, to_stderr=json_path == "-" or csv_path == "-")
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


def _run_with_progress(loaded, config, draft_p_min):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as progress:
        task = progress.add_task("warm-up", total=config.total_runs)

        def on_run(prompt_id: str, variant: str, repeat: int) -> None:
            what = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{config.repeats}"
            progress.update(task, advance=1, description=f"{what} {prompt_id} {variant}")

        return run_bench(loaded, config, draft_p_min=draft_p_min, on_run=on_run)


# ------------------------------------------------------------------------------------------- rendering


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _f(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _mb(n) -> str:
    return "?" if n is None else f"{n / 1e6:,.0f} MB"


def _console(to_stderr: bool):
    stream = sys.stderr if to_stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 120
    return console(stderr=to_stderr, width=width, highlight=False)


def _header(report: dict) -> list[str]:
    s, st = report["setup"], report["settings"]
    m = s["machine"]
    cpu, llama, gpu = m.get("cpu", {}), m.get("llama", {}), m.get("gpu", {})
    ram = (m.get("ram") or {}).get("total")

    def model(d) -> str:
        return f"{d['file']} ({d.get('quantization') or '?'}, {_mb(d.get('size_bytes'))}, {d.get('gpu_layers', 0)} layers on GPU)"

    lines = [f"target  {model(s['target'])}"]
    if s.get("draft"):
        lines.append(f"draft   {model(s['draft'])}")
    ggml = llama.get("ggml_version")
    lines.append(
        f"machine {cpu.get('model', '?')}, {cpu.get('physical_cores', '?')} cores / {cpu.get('logical_cores', '?')} threads, "
        f"{f'{ram / 2**30:.1f}' if ram else '?'} GiB RAM; GPU backend: {gpu.get('backend', '?')}; "
        f"llama-cpp-python {llama.get('llama_cpp_python') or '?'}" + (f" (ggml {ggml})" if ggml else "")
    )
    temp = st["temperature"]
    sampling = "greedy (temperature 0)" if temp == 0 else f"temperature {temp}, top-k {st['top_k']}, top-p {st['top_p']}"
    lines.append(
        f"setup   ctx {s['ctx_size']}, {s['threads']} threads, {sampling}, seed {st['seed']}, max {st['max_tokens']} tokens"
        + ("" if st["chat_template"] else ", no chat template")
    )
    lines.append(
        f"runs    {_n(st['prompts'], 'prompt')} × {_n(st['repeats'], 'repeat')}, target alone and each method interleaved"
        + (" after a warm-up" if st["warmup"] else "") + ", fresh KV cache per run"
    )
    lines.append(f"timing  load {s['load_seconds']:.1f}s and prompt processing are not in tokens/s (generated tokens / "
                 f"generation seconds, median of repeats)")
    return lines


def _render(report: dict, *, to_stderr: bool) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    con = _console(to_stderr)
    con.print(Text("dspark bench", style="bold"))
    for line in _header(report):
        con.print(Text(line, style="dim"))
    best = report["best"]
    variants = report["variants"]
    if best is None:
        con.print("nothing was measured")
        return
    bv = next(v for v in variants if v["variant"] == best["variant"])

    t = Table(title=f"{bv['variant']} vs the target alone (measured)", title_justify="left")
    for name, justify in (("prompt", "left"), ("category", "left"), ("target tok/s", "right"), ("spec tok/s", "right"),
                          ("speedup", "right"), ("accept", "right"), ("tok/step", "right"), ("predicted", "right"),
                          ("same", "center")):
        t.add_column(name, justify=justify)

    def row(label, cat, r, style=None, same=None, tie=None):
        mark = "" if same is None else ("✓" if same else ("[yellow]≈[/]" if tie else "[bold red]✗[/]"))
        t.add_row(label, cat, _f(r["baseline_tokens_per_second"], 1), _f(r["speculative_tokens_per_second"], 1),
                  _x(r["speedup"]), _pct(r["acceptance_rate"]), _f(r["mean_accepted_tokens"]),
                  _x(r["predicted_speedup"]), mark, style=style)

    for r in bv["per_prompt"]:
        row(r["prompt_id"], r["category"], r, same=r.get("identical"), tie=r.get("near_tie"))
    t.add_section()
    for r in bv["per_category"]:
        row(escape(f"[{r['category']}]"), _n(r["prompts"], "prompt"), r)
    t.add_section()
    row("overall", _n(bv["overall"]["prompts"], "prompt"), bv["overall"], style="bold", same=report["identical"],
        tie=report["identical_up_to_near_ties"])
    con.print(t)

    s = Table(title="Methods: measured, and predicted by Leviathan et al. from the measured α, γ, c and verify cost",
              title_justify="left")
    for name in ("method", "spec\ntok/s", "speedup\nmeasured", "speedup\npredicted", "accept", "α", "tok/step\nmeasured",
                 "tok/step\npredicted", "γ", "c", "verify"):
        s.add_column(name, justify="left" if name == "method" else "right", no_wrap=True)
    for v in variants:
        r = v["overall"]
        star = " ★" if v["variant"] == best["variant"] and len(variants) > 1 else ""
        s.add_row(v["variant"] + star, _f(r["speculative_tokens_per_second"], 1), _x(r["speedup"]),
                  _x(r["predicted_speedup"]), _pct(r["acceptance_rate"]), _f(r["alpha"]), _f(r["mean_accepted_tokens"]),
                  _f(r["predicted_mean_accepted_tokens"]), _f(r["mean_draft_length"], 1), _f(r["cost_ratio"], 3),
                  _f(r["verify_cost"]))
    con.print(s)
    confirmed = report.get("confirmed")
    if confirmed:
        con.print(Text(f"★ {confirmed['variant']} scored best in the sweep ({_x(bv['overall']['speedup'])}); measured "
                       f"again against the target alone: {_x(confirmed['speedup'])}", style="bold"))
    width = max(len(v["variant"]) for v in variants)
    con.print(Text("draft lengths the cost model chose (target steps; none = a plain step)", style="bold"))
    for v in variants:
        chosen = ", ".join(f"{k} {n}" for k, n in list(v.get("draft_lengths", {}).items())[:6]) or "—"
        con.print(Text(f"  {v['variant']:<{width}}  {chosen}"))
        for pid, note in v.get("speculation_off", {}).items():
            con.print(Text(f"  {'':<{width}}  {pid}: {note}", style="yellow"))
    con.print(Text("acceptance by draft position, % (measured)", style="bold"))
    for v in variants:
        pos = v["overall"]["acceptance_by_position"]
        con.print(Text(f"  {v['variant']:<{width}}  " + (" ".join(f"{p * 100:3.0f}" for p in pos[:16]) or "—")
                       + (" …" if len(pos) > 16 else "")))
    for line in ("accept = accepted / drafted; α = P(accepted | the drafted tokens before it accepted); γ = mean tokens drafted",
                 "tok/step = tokens per target step, bonus token included (target alone = 1.00)",
                 "c = draft step / target-alone step; verify = speculative target step / target-alone step (measured)",
                 "predicted = E / (f·γ·c + verify), E = f·(1 − α^(γ+1)) / (1 − α) + (1 − f)  (Leviathan et al. 2023;",
                 "          f = share of target steps that had a draft, 1.00 for a draft model)",
                 "the cost model picks each step's draft length up to --draft-max (γ is their mean; 0 steps count too);",
                 "          --draft-fixed drafts --draft-max every step"):
        con.print(Text(line, style="dim"))
    ov = bv["overall"]
    n_prompt = sum(r.get("prompt_tokens") or 0 for r in bv["per_prompt"])
    con.print(Text(f"prompt processing (not in tok/s): {n_prompt} tokens in {_f(ov['baseline_prompt_seconds'])}s for the target "
                   f"alone, {_f(ov['speculative_prompt_seconds'])}s with {bv['variant']} (both models)", style="dim"))

    _chart(con, f"Speedup by category ({bv['variant']})",
           [(r["category"], r["speedup"]) for r in bv["per_category"]] + [("overall", bv["overall"]["speedup"])])
    if len(variants) > 1:
        _chart(con, "Speedup by method and draft length",
               [(v["variant"] + (" ★" if v["variant"] == best["variant"] else ""), v["overall"]["speedup"]) for v in variants])

    if report["identical"] is True:
        n = sum(1 for r in report["runs"] if r["variant"] != "target")
        con.print(Text(f"✓ identical: all {n} speculative outputs match the target alone token for token", style="green"))
    elif report["identical"] is False:
        mm = report["mismatches"]
        outputs = sorted({(m["prompt_id"], m["variant"]) for m in mm})
        con.print(Text(f"✗ NOT IDENTICAL: {len(mm)} of {sum(1 for r in report['runs'] if r['variant'] != 'target')} "
                       f"speculative outputs ({len(outputs)} prompt/method pairs) differ from the target alone at "
                       "temperature 0", style="bold red"))
        shown = set()
        for m in mm:
            key = (m["prompt_id"], m["variant"], m["position"])
            if key in shown:
                continue
            shown.add(key)
            reps = sum(1 for x in mm if (x["prompt_id"], x["variant"], x["position"]) == key)
            why = (f"near-tie, candidates {m['margin']:.4f} logits apart" if m["near_tie"]
                   else f"REAL: logits {m['margin']:.3f} apart" if m["margin"] is not None else "")
            con.print(Text(f"  {m['prompt_id']} {m['variant']}: first difference at token {m['position']} "
                           f"({_n(reps, 'repeat')}); {why}", style="yellow" if m["near_tie"] else "bold red"))
        if report["identical_up_to_near_ties"]:
            con.print(Text("  each starts at a near-tie: this llama.cpp build rounds 1-token and multi-token batches",
                           style="yellow"))
            con.print(Text("  differently (not batch-invariant); no draft overrode a clear choice of the target", style="yellow"))
    else:
        con.print(Text("identity not checked: sampling (temperature > 0) gives different, equally distributed outputs",
                       style="dim"))


def _chart(con, title: str, rows: list[tuple[str, float | None]]) -> None:
    from rich.text import Text

    con.print(Text(title, style="bold"))
    top = max([v for _, v in rows if v is not None] + [1.0])
    label_w = max(len(lbl) for lbl, _ in rows)
    for label, v in rows:
        line = Text(f"  {label:<{label_w}} ")
        if v is None:
            line.append("—")
        else:
            cells = v / top * BAR
            full, part = int(cells), cells - int(cells)
            bar = "█" * full + (" ▏▎▍▌▋▊▉"[int(part * 8)] if part * 8 >= 1 else "")
            line.append(f"{bar:<{BAR + 1}}", style="green" if v >= 1.0 else "red")
            line.append(f" {v:.2f}×")
        con.print(line)
    con.print(Text(f"  {'':<{label_w}} (1.00× = the target alone; full bar = {top:.2f}×)", style="dim"))
