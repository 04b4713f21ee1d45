"""The benchmark as data: the JSON document (--json) and the per-prompt CSV rows (--csv). The top level
repeats the best variant's overall figures so a script reads `speedup` without walking the sweep."""

from __future__ import annotations

import csv
import io
import json
import math

from .runner import BenchConfig, BenchRun

TOP_LEVEL = ("speedup", "baseline_tokens_per_second", "speculative_tokens_per_second", "acceptance_rate",
             "mean_accepted_tokens", "alpha", "mean_draft_length", "cost_ratio", "verify_cost",
             "predicted_mean_accepted_tokens", "predicted_speedup", "acceptance_by_position")

CSV_COLUMNS = ("variant", "method", "draft_max", "prompt_id", "category", "prompt_tokens", "tokens",
               "baseline_tokens_per_second", "speculative_tokens_per_second", "speedup", "speedup_min", "speedup_max",
               "acceptance_rate", "mean_accepted_tokens", "alpha", "mean_draft_length", "cost_ratio", "verify_cost",
               "predicted_mean_accepted_tokens", "predicted_speedup", "identical", "acceptance_by_position")


def build_report(run: BenchRun, summary: dict, config: BenchConfig, setup: dict) -> dict:
    bad = {(m.prompt_id, m.variant): m for m in run.mismatches or []}
    for v in summary["variants"]:
        for row in v["per_prompt"]:
            row["prompt_tokens"] = run.prompt_tokens.get(row["prompt_id"])
            m = bad.get((row["prompt_id"], v["variant"]))
            row["identical"] = None if run.mismatches is None else m is None
            row["near_tie"] = None if m is None else m.near_tie
    best = next((v for v in summary["variants"] if v["variant"] == summary["best"]), None)
    report: dict = {}
    for key in TOP_LEVEL:
        report[key] = best["overall"][key] if best else None
    report.update({
        "identical": None if run.mismatches is None else not run.mismatches,
        # False only when some difference is not a floating-point near-tie (see bench_runner.NEAR_TIE_LOGITS).
        "identical_up_to_near_ties": None if run.mismatches is None else all(m.near_tie for m in run.mismatches),
        "best": {"variant": best["variant"], "method": best["method"], "draft_max": best["draft_max"]} if best else None,
        "per_prompt": best["per_prompt"] if best else [],
        "per_category": best["per_category"] if best else [],
        "variants": summary["variants"],
        # After a sweep, the best variant measured again against the target alone (None without a sweep).
        "confirmed": _confirmed(run),
        "mismatches": [vars(m) for m in run.mismatches or []],
        "settings": {
            "methods": config.methods, "draft_max": config.draft_max, "repeats": config.repeats,
            "warmup": config.warmup, "max_tokens": config.max_tokens,
            "temperature": config.params.temperature, "top_k": config.params.top_k,
            "top_p": config.params.top_p, "seed": config.params.seed, "raw": config.raw,
            "chat_template": run.templated, "prompts": len(config.prompts),
            "order": "interleaved, rotated every repeat, fresh KV cache per run",
        },
        "setup": setup,
        "wall_seconds": run.wall_seconds,
        "warmup_seconds": run.warmup_seconds,
        "baseline_texts": run.texts,
        "runs": [_run_row(r) for r in run.records],
    })
    return _clean(report)


def _confirmed(run: BenchRun) -> dict | None:
    if not run.confirmation:
        return None
    from .stats import summarize

    again = summarize(run.confirmation)
    v = again["variants"][0]
    return {"variant": v["variant"], **v["overall"]}


def _run_row(r) -> dict:
    return {
        "prompt_id": r.prompt_id, "category": r.category, "variant": r.variant, "repeat": r.repeat,
        "tokens": r.n_generated, "prompt_tokens": r.n_prompt, "prompt_seconds": r.t_prompt,
        "generation_seconds": r.t_gen, "draft_seconds": r.t_draft, "target_seconds": r.t_target,
        "target_steps": r.n_target_steps, "draft_steps": r.n_draft_steps, "drafted": r.n_drafted,
        "accepted": r.n_accepted, "finish_reason": r.finish_reason,
        "tokens_per_second": r.n_generated / r.t_gen if r.t_gen > 0 else 0.0,
        "engine": r.engine, "draft_lengths": r.draft_lengths, "speculation_note": r.speculation_note,
        "accepted_by": r.accepted_by,
    }


def _clean(x):
    """Round floats for reading and turn non-finite ones into null (JSON has no inf/nan)."""
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for v in report["variants"]:
        for row in v["per_prompt"]:
            out = {**row, "variant": v["variant"], "method": v["method"], "draft_max": v["draft_max"]}
            out["acceptance_by_position"] = ";".join(f"{p:.3f}" for p in row["acceptance_by_position"])
            w.writerow({k: ("" if out.get(k) is None else out.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()
