#!/usr/bin/env python3
"""How much can the drafting memory add to a pair on a repetitive workload, on this machine, at best?

    python3 scripts/memory_ceiling.py                                   # demo pair
    python3 scripts/memory_ceiling.py --target T.gguf --draft D.gguf -n 128

The target alone answers `bench`'s repetitive suite (ten JSON records of one schema) greedily. Then, for every
position of requests 2..10, what each source would draft there and how far it is right:
  - the draft model: its greedy picks along the target's own answer (one batch, teacher-forced: what it drafts
    while every draft before was accepted), right as far as they match;
  - the memory: engine/memory.py fed the earlier answers, recall or else resume, right as far as it matches.
With the costs measured here (the target's step over n tokens V(n), a draft step, the draft model's batch of
several tokens per token), an oracle that knows which drafts are right picks the cheapest rounds (dynamic
programming over each answer) for each drafter: the model alone, the memory alone, and the two combined as the
engine combines them (a free head, the model's part, a free tail: costs.Plan). No real round wastes less, so
each figure is a ceiling: `dspark bench --suite repetitive` measures what the engine reaches.

The report (stdout, --json for JSON): each ceiling as a speed-up over the target alone, and the combined one over
the model alone: the most "memory on / off" can read for the hybrid on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dspark_cli.bench.suite import REPETITIVE
from dspark_cli.engine.loop import generate
from dspark_cli.engine.memory import DraftMemory
from dspark_cli.errors import DsparkError
from dspark_cli.llama.model import Model
from dspark_cli.llama.vocab import pairing_problem
from dspark_cli.models.demo import demo_pair
from dspark_cli.prompt import build_prompt


def timed(model: Model, tokens: list[int], base: int, reps: int, n_logits: int = 1) -> float:
    """Median seconds of appending `tokens` with logits for the last n_logits (a verify: all of them, as the engine
    reads every row; a draft step or batch: the last)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.eval(tokens, n_logits=n_logits)
        times.append(time.perf_counter() - start)
        model.truncate(base)
    return statistics.median(times)


def costs(target: Model, draft: Model, prompt: list[int], width: int, reps: int) -> dict:
    """V(n) for n = 1..width + 1, a draft step and a draft batch's cost per token, relative to V(1)."""
    target.eval(prompt, n_logits=0)
    draft.eval(prompt, n_logits=0)
    base, pool = len(prompt), prompt[1:]
    fill = lambda n: [pool[i % len(pool)] for i in range(n)]  # noqa: E731 (ordinary tokens: their values cost alike)
    v = {n: timed(target, fill(n), base, reps, n_logits=n) for n in range(1, width + 2)}
    d = timed(draft, fill(1), base, reps)
    c = timed(draft, fill(8), base, reps) / 8
    target.truncate(0)
    draft.truncate(0)
    return {"verify": {n: t / v[1] for n, t in v.items()}, "draft": d / v[1], "catchup": c / v[1], "v1": v[1]}


def run_of(right: list[bool], i: int) -> int:
    """How many consecutive positions from i are right."""
    n = 0
    while i + n < len(right) and right[i + n]:
        n += 1
    return n


def model_right(draft: Model, prompt: list[int], answer: list[int]) -> list[int]:
    """For each answer position, how many tokens the draft model's greedy drafts from there get right."""
    draft.truncate(0)
    logits = draft.eval(prompt + answer[:-1], n_logits=len(answer))
    draft.truncate(0)
    picks = np.argmax(np.asarray(logits), axis=1)
    right = [int(p) == t for p, t in zip(picks, answer)]
    return [run_of(right, i) for i in range(len(answer))]


def memory_right(memory: DraftMemory, prompt: list[int], answer: list[int], width: int) -> list[int]:
    """For each answer position, how many tokens the memory's proposal there gets right."""
    out = []
    for i in range(len(answer)):
        seq = prompt + answer[:i]
        proposal = memory.recall(seq, width) or memory.resume(seq, width)
        n = 0
        while n < len(proposal) and i + n < len(answer) and proposal[n] == answer[i + n]:
            n += 1
        out.append(n)
    return out


def cheapest(length: int, model: list[int] | None, free: list[int] | None, c: dict, width: int) -> float:
    """The least cost (in target steps) of writing an answer of `length` tokens in rounds whose drafts are all
    right: up to `width` drafts a round, a free head, the model's part, a free tail (either source may be None)."""
    verify, d, per = c["verify"], c["draft"], c["catchup"]
    best = [float("inf")] * (length + 1)
    best[0] = 0.0
    for i in range(length):
        if best[i] == float("inf"):
            continue
        for f in range(0, min(free[i] if free else 0, width) + 1):
            at = i + f
            m_top = min(model[at] if model and at < length else 0, width - f)
            for m in range(0, m_top + 1):
                drafting = 0.0 if not m else (per * (f + 1) + (m - 1) * d if f else m * d)
                t_top = min(free[at + m] if free and m and at + m < length else 0, width - f - m)
                for t in range(0, t_top + 1):
                    j = min(length, at + m + t + 1)  # the target's own token comes along
                    cost = best[i] + drafting + verify[f + m + t + 1]
                    if cost < best[j]:
                        best[j] = cost
    return best[length]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=8, help="drafts per round (dspark's default: 8)")
    ap.add_argument("--reps", type=int, default=7, help="timings per cost figure (their median)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = ap.parse_args()
    if (args.target is None) != (args.draft is None):
        ap.error("give both --target and --draft, or neither for the demo pair")
    if args.draft_max < 1 or args.reps < 1 or args.max_tokens < 1:
        ap.error("--draft-max, --reps and --max-tokens must be at least 1")
    target_path, draft_path = (Path(args.target), Path(args.draft)) if args.target else demo_pair()
    target = Model(target_path, role="target", n_ctx=2048)
    draft = Model(draft_path, role="draft", n_ctx=2048)
    problem = pairing_problem(target, draft)
    if problem:
        ap.error(f"the draft cannot pair with the target ({problem}): this script replays same-vocabulary drafts")

    prompts = [build_prompt(target, text)[0] for _, _, text in REPETITIVE]
    print("measuring costs", file=sys.stderr, flush=True)
    c = costs(target, draft, prompts[0], args.draft_max, args.reps)
    memory = DraftMemory(64 << 20)
    totals = {"target": 0.0, "model": 0.0, "memory": 0.0, "combined": 0.0}
    tokens = 0
    for n, prompt in enumerate(prompts):
        print(f"request {n + 1} of {len(prompts)}", file=sys.stderr, flush=True)
        target.truncate(0)
        answer = [e.token for e in generate(target, prompt, max_tokens=args.max_tokens) if e.token is not None]
        target.truncate(0)
        if n and answer:  # requests 2..10: the first has nothing to recall
            model = model_right(draft, prompt, answer)
            free = memory_right(memory, prompt, answer, args.draft_max)
            tokens += len(answer)
            totals["target"] += len(answer)
            totals["model"] += cheapest(len(answer), model, None, c, args.draft_max)
            totals["memory"] += cheapest(len(answer), None, free, c, args.draft_max)
            totals["combined"] += cheapest(len(answer), model, free, c, args.draft_max)
        memory.add(prompt + answer, len(prompt))
    if not tokens:
        sys.exit("error: the target wrote nothing for requests 2-10 (an end token first): nothing to replay")
    ceiling = {name: tokens / cost for name, cost in totals.items()}
    report = {"costs": c, "tokens": tokens, "ceiling": ceiling,
              "combined_over_model": ceiling["combined"] / ceiling["model"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    v = c["verify"]
    print(f"costs, in target steps: V(2) {v[2]:.2f}, V(5) {v[5]:.2f}, V({args.draft_max + 1}) {v[args.draft_max + 1]:.2f}; "
          f"a draft step {c['draft']:.2f}; a draft batch {c['catchup']:.2f} a token")
    print(f"requests 2-{len(prompts)}, {tokens} tokens; ceilings over the target alone:")
    for name in ("model", "memory", "combined"):
        print(f"  {name:9s} {ceiling[name]:.2f}x")
    print(f"  combined over the model alone: {report['combined_over_model']:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except DsparkError as e:  # a missing or foreign model file: one line, as dspark's commands say it
        print(f"memory_ceiling: error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
