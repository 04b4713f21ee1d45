#!/usr/bin/env python3
"""The derived draft (models/derive.py) against the draft file itself, interleaved in one process.

    python3 scripts/bench_draft_layout.py --real                 # the Qwen2.5-Coder pair (fetch_real_pair.py)
    python3 scripts/bench_draft_layout.py --rounds 5 --target T.gguf --draft D.gguf

Three contenders on the built-in suite, greedy, the same settings: the target alone, dspark's default (hybrid)
with the derived copy, and the same with the file as it is. Each round runs every prompt with all three back to
back in an order that rotates every round, from a fresh KV cache; each drafter starts from its own cost profile
(as a user's runs do; the derived copy and the file are different files, so they have one each). Per prompt:
each draft's speedup over the target alone in the same round (median and range over rounds), its acceptance and
the share of steps that drafted. Outputs must equal the target alone's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dspark_cli.bench.prompts import builtin_prompts  # noqa: E402
from dspark_cli.engine.drafters import METHOD_HYBRID, make_drafter  # noqa: E402
from dspark_cli.engine.loop import generate  # noqa: E402
from dspark_cli.llama.model import Model  # noqa: E402
from dspark_cli.models.derive import fastest_draft  # noqa: E402
from dspark_cli.models.profiles import open_profile, profile_key  # noqa: E402
from dspark_cli.prompt import build_prompt  # noqa: E402

REAL = Path.home() / ".cache" / "dspark" / "real-pair"


def run(target, drafter, profile, tokens, n):
    target.truncate(0)
    if drafter is not None:
        drafter.model.truncate(0)
    events = list(generate(target, tokens, drafter=drafter, max_tokens=n, profile=profile))
    stats = events[-1].stats
    return [e.token for e in events if e.token is not None], stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()
    if args.real:
        args.target = args.target or str(REAL / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
        args.draft = args.draft or str(REAL / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    if not (args.target and args.draft):
        ap.error("--real, or --target and --draft")
    target = Model(args.target, role="target", n_ctx=2048)
    derived_path = fastest_draft(Path(args.draft), target, threads=None)
    if derived_path == Path(args.draft):
        print("no derived copy is used for this draft on this build: nothing to compare", file=sys.stderr)
        return 1
    drafts = {name: Model(path, role="draft", n_ctx=2048) for name, path in
              (("derived", derived_path), ("as-is", Path(args.draft)))}
    contenders = {"target": (None, None)}
    for name, model in drafts.items():
        contenders[name] = (make_drafter(METHOD_HYBRID, model), open_profile(profile_key(target, model)))
    prompts = [(p.id, build_prompt(target, p.text)[0]) for p in builtin_prompts()]
    for name, (drafter, profile) in contenders.items():  # warm-up
        run(target, drafter, profile, prompts[0][1], 32)
    speed: dict = {}
    accept: dict = {}
    drafted: dict = {}
    mismatches = 0
    names = list(contenders)
    t0 = time.time()
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]
        for pid, tokens in prompts:
            outputs = {}
            for name in order:
                drafter, profile = contenders[name]
                out, stats = run(target, drafter, profile, tokens, args.n)
                outputs[name] = out
                speed.setdefault((pid, name), []).append(stats.tokens_per_second)
                if name != "target":
                    accept.setdefault((pid, name), []).append((stats.n_accepted, stats.n_drafted))
                    steps = stats.n_target_steps or 1
                    drafted.setdefault((pid, name), []).append(sum(1 for d, _ in stats.rounds if d) / steps)
            mismatches += sum(outputs[n] != outputs["target"] for n in names[1:])
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t0:.0f}s)", file=sys.stderr)
    print("| prompt | derived: speedup (range) | accepted | drafted | as-is: speedup (range) | accepted | drafted |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = {n: [] for n in names[1:]}
    for pid, _ in prompts:
        cells = []
        for name in names[1:]:
            ratios = [s / b for s, b in zip(speed[(pid, name)], speed[(pid, "target")])]
            totals[name].extend(ratios)
            a = sum(x for x, _ in accept[(pid, name)])
            d = sum(y for _, y in accept[(pid, name)])
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                         f"{a / d if d else 0:.0%} | {statistics.median(drafted[(pid, name)]):.0%}")
        print(f"| {pid} | " + " | ".join(cells) + " |")
    print("| **all prompts, median of per-round ratios** | " + " | ".join(
        f"{statistics.median(totals[n]):.2f}x | | " for n in names[1:]) + "|")
    print(f"outputs differing from the target alone: {mismatches}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
