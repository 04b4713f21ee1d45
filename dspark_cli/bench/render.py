"""`dspark bench`'s report as a terminal table: per prompt and category, the methods against Leviathan's
prediction, the draft lengths the cost model chose, acceptance by position, charts, and the identity verdict."""

from __future__ import annotations

import os
import sys

from ..console import console
from .stats import CONTROL

BAR = 28  # chart width in cells



def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _f(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def _spread(values: list[float] | None, fmt) -> str:
    """Lowest–highest over the rounds (one value: itself; none: a dash)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return fmt(lo) if len(values) == 1 or fmt(lo) == fmt(hi) else f"{fmt(lo).rstrip('%')}–{fmt(hi)}"


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
        name = f"{d['derived_from']}, as its derived copy {d['file']}" if d.get("derived_from") else d["file"]
        return f"{name} ({d.get('quantization') or '?'}, {_mb(d.get('size_bytes'))}, {d.get('gpu_layers', 0)} layers on GPU)"

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
    if s.get("exact"):
        lines.append(f"exact   {s['exact']} on this build and device (the proof at load)")
    lines.append(f"timing  load {s['load_seconds']:.1f}s and prompt processing are not in tokens/s (generated tokens / "
                 f"generation seconds, median of repeats)")
    return lines


# Long (114 lines) on purpose: the report's sections in the order they print, one after another; each is a few


# lines of Rich table code that reads best where it shows.


def render(report: dict, *, to_stderr: bool) -> None:
    """The report as tables and charts: on stdout, or on stderr when stdout carries the JSON or CSV."""
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
    # The target alone run again (--methods ...,control): per prompt, its lowest-highest ratio over the rounds
    # is the noise the speculative spread beside it must be read against.
    control = next((v for v in variants if v["variant"] == CONTROL and v is not bv), None)
    noise = {r["prompt_id"]: r.get("speedup_rounds") for r in control["per_prompt"]} if control else {}

    t = Table(title=f"{bv['variant']} vs the target alone (measured)", title_justify="left")
    for name, justify in (("prompt", "left"), ("target tok/s", "right"), ("spec tok/s", "right"),
                          ("speedup", "right"), ("rounds", "right"), ("drafted", "right"), ("accept", "right"),
                          ("tok/step", "right"), ("predicted", "right"), ("same", "center")):
        t.add_column(name, justify=justify)
        if name == "rounds" and control:
            t.add_column("noise", justify="right")

    def row(label, r, style=None, same=None, tie=None, noise_rounds=None):
        mark = "" if same is None else ("✓" if same else ("[yellow]≈[/]" if tie else "[bold red]✗[/]"))
        cells = [label, _f(r["baseline_tokens_per_second"], 1), _f(r["speculative_tokens_per_second"], 1),
                 _x(r["speedup"]), _spread(r.get("speedup_rounds"), _f)]
        if control:
            cells.append(_spread(noise_rounds, _f))
        t.add_row(*cells, _spread(r.get("drafted_fraction_rounds"), _pct), _pct(r["acceptance_rate"]),
                  _f(r["mean_accepted_tokens"]), _x(r["predicted_speedup"]), mark, style=style)

    for r in bv["per_prompt"]:
        row(r["prompt_id"], r, same=r.get("identical"), tie=r.get("near_tie"), noise_rounds=noise.get(r["prompt_id"]))
    t.add_section()
    for r in bv["per_category"]:
        row(escape(f"[{r['category']}] ({r['prompts']})"), r)
    t.add_section()
    row(f"overall ({bv['overall']['prompts']})", bv["overall"], style="bold", same=report["identical"],
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
    con.print(Text("accepted tokens by source (draft model, prompt lookup, memory of earlier answers, the memory "
                   "resumed after a value)", style="bold"))
    for v in variants:
        by = v.get("accepted_by", {})
        total = sum(by.values())
        shares = ", ".join(f"{k} {n / total:.0%}" for k, n in by.items()) if total else "—"
        con.print(Text(f"  {v['variant']:<{width}}  {shares}"))
    con.print(Text("acceptance by draft position, % (measured)", style="bold"))
    for v in variants:
        pos = v["overall"]["acceptance_by_position"]
        con.print(Text(f"  {v['variant']:<{width}}  " + (" ".join(f"{p * 100:3.0f}" for p in pos[:16]) or "—")
                       + (" …" if len(pos) > 16 else "")))
    for line in ("accept = accepted / drafted; α = P(accepted | the drafted tokens before it accepted); γ = mean tokens drafted",
                 "rounds = the lowest–highest speedup over the repeats, each against the target alone in the same round;",
                 "          drafted = the share of target steps that verified a draft, lowest–highest over the repeats",
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
