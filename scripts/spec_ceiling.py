#!/usr/bin/env python3
"""How much faster than the target alone can speculative decoding go with this pair on this machine?

    python3 scripts/spec_ceiling.py                                  # demo pair
    python3 scripts/spec_ceiling.py --target T.gguf --draft D.gguf --alpha 0.9,0.95

Measures the costs both dspark engines are made of, then prints each engine's ceiling: the speedup it
would reach with per-token acceptance α (`dspark bench` reports it), no Python overhead and no work lost.
A measured speedup near its ceiling means the engine is not the limit; the pair and the machine are.

  target alone   one-token target step on all the threads
  sequential     draft step and verify batches of k+1 tokens on all the threads, one after the other
  overlapped     draft step on the draft's share of the threads and verify batches on the target's
                 (engine.split_threads), measured while both run at once, as the engine runs them

Medians over --reps rounds, each round measuring everything back to back, so a machine that speeds up or
slows down between rounds shifts every figure alike. The report goes to stdout (--json for JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from dspark_cli.bench.stats import overlapped_ceiling, sequential_ceiling
from dspark_cli.models.demo import demo_pair
from dspark_cli.errors import DsparkError
from dspark_cli.llama.model import Model
from dspark_cli.prompt import build_prompt

PROMPT = "Write a short story about a robot learning to paint."



def split_threads(n: int) -> tuple[int, int]:
    """(target, draft) threads out of n for the overlapped ceiling: the target's verify is the larger job."""
    draft = max(1, n // 3)
    return max(1, n - draft), draft

def filler(pool: list[int], n: int) -> list[int]:
    """n ordinary tokens (their values don't change what a step costs)."""
    return [pool[i % len(pool)] for i in range(n)]


def timed(model: Model, tokens: list[int], base: int, reps: int) -> float:
    """Median seconds of appending `tokens` with logits for all of them (a verify batch, or a step)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.eval(tokens, n_logits=len(tokens))
        times.append(time.perf_counter() - start)
        model.truncate(base)
    return statistics.median(times)


def concurrent(target: Model, draft: Model, tokens: list[int], base: int, seconds: float) -> tuple[float, float]:
    """Median seconds of a target verify of `tokens` and of a draft step while the two run at once."""
    verify, steps, stop = [], [], threading.Event()

    def verifier():
        while not stop.is_set():
            start = time.perf_counter()
            target.eval(tokens, n_logits=len(tokens))
            verify.append(time.perf_counter() - start)
            target.truncate(base)

    worker = threading.Thread(target=verifier)
    worker.start()
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end or not verify:
            start = time.perf_counter()
            draft.eval(tokens[:1], n_logits=1)
            steps.append(time.perf_counter() - start)
            draft.truncate(base)
    finally:
        stop.set()
        worker.join()
    return statistics.median(verify), statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--threads", type=int, help="threads in all (default: the physical cores)")
    ap.add_argument("--draft-max", type=int, default=8, help="verify batches of 2..draft-max+1 tokens")
    ap.add_argument("--alpha", default="0.9,0.95,0.98", help="per-token acceptance rates to evaluate")
    ap.add_argument("--reps", type=int, default=3, help="rounds of measurements")
    ap.add_argument("--seconds", type=float, default=1.5, help="length of each concurrent measurement")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = ap.parse_args()
    if (args.target is None) != (args.draft is None):
        ap.error("give both --target and --draft, or neither for the demo pair")
    if args.draft_max < 1 or args.reps < 1 or args.seconds <= 0:
        ap.error("--draft-max and --reps must be at least 1, --seconds positive")
    alphas = [float(a) for a in args.alpha.split(",")]
    if not all(0.0 <= a < 1.0 for a in alphas):
        ap.error("--alpha values must be in [0, 1)")

    target_path, draft_path = (Path(args.target), Path(args.draft)) if args.target else demo_pair()
    target = Model(target_path, role="target", n_ctx=1024, n_threads=args.threads)
    draft = Model(draft_path, role="draft", n_ctx=1024, n_threads=args.threads)
    n_all = target.n_threads
    n_target, n_draft = split_threads(n_all)
    prompt, _ = build_prompt(target, PROMPT)
    pool = prompt[1:]
    prompt += filler(pool, 64)  # a context of a typical mid-answer length
    target.eval(prompt, n_logits=0)
    draft.eval(prompt, n_logits=0)
    base = len(prompt)
    ks = range(1, args.draft_max + 1)

    runs: dict[str, list[float]] = {}
    for rep in range(args.reps):
        print(f"round {rep + 1} of {args.reps}", file=sys.stderr, flush=True)
        target.set_threads(n_all)
        draft.set_threads(n_all)
        runs.setdefault("step", []).append(timed(target, filler(pool, 1), base, 12))
        runs.setdefault("draft_all", []).append(timed(draft, filler(pool, 1), base, 12))
        for k in ks:
            runs.setdefault(f"verify_all_{k}", []).append(timed(target, filler(pool, k + 1), base, 6))
        if n_all >= 2:
            target.set_threads(n_target)
            draft.set_threads(n_draft)
            for k in ks:
                verify, step = concurrent(target, draft, filler(pool, k + 1), base, args.seconds)
                runs.setdefault(f"verify_split_{k}", []).append(verify)
                runs.setdefault(f"draft_split_{k}", []).append(step)
    med = {name: statistics.median(v) for name, v in runs.items()}

    rows = []
    for alpha in alphas:
        seq = {k: sequential_ceiling(alpha, k, med["step"], med["draft_all"], med[f"verify_all_{k}"]) for k in ks}
        row = {"alpha": alpha, "sequential": seq}
        if n_all >= 2:
            row["overlapped"] = {k: overlapped_ceiling(alpha, k, med["step"], med[f"draft_split_{k}"],
                                                       med[f"verify_split_{k}"]) for k in ks}
        rows.append(row)
    result = {"target": str(target_path), "draft": str(draft_path), "threads": n_all,
              "split": [n_target, n_draft], "seconds": med, "ceilings": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return

    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    print(f"target {target_path.name}, draft {draft_path.name}, {n_all} threads "
          f"(overlapped: {n_target} target + {n_draft} draft)")
    print(f"target alone: {ms(med['step'])} a token = {1 / med['step']:.1f} tok/s")
    print(f"draft step: {ms(med['draft_all'])} on {n_all} threads = {1 / med['draft_all']:.1f} tok/s"
          f" (c = {med['draft_all'] / med['step']:.2f})")
    print("verify of k+1 tokens, all threads: " + ", ".join(f"k={k} {ms(med[f'verify_all_{k}'])}" for k in ks))
    if n_all >= 2:
        print(f"overlapped, both running: draft step {ms(statistics.median(med[f'draft_split_{k}'] for k in ks))}; "
              "verify " + ", ".join(f"k={k} {ms(med[f'verify_split_{k}'])}" for k in ks))
    print("ceiling over the target alone (best k):")
    for row in rows:
        parts = []
        for engine in ("sequential", "overlapped"):
            if engine in row:
                k = max(row[engine], key=row[engine].get)
                part = f"{engine} {row[engine][k]:.2f}x at k={k}"
                if engine == "overlapped" and med[f"draft_split_{k}"] * 1.001 >= med["step"] / row[engine][k]:
                    part += " (bound by the draft's own speed)"
                parts.append(part)
        print(f"  alpha {row['alpha']:.2f}: " + ", ".join(parts))


if __name__ == "__main__":
    try:
        main()
    except DsparkError as e:  # a missing or foreign model file: one line, as dspark's commands say it
        print(f"spec_ceiling: error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
