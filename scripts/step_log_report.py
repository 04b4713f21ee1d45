#!/usr/bin/env python3
"""Where each batching server's time went, from the step logs DSPARK_STEP_LOG wrote (dspark_cli/steplog.py).

    DSPARK_STEP_LOG=/tmp/steps-{pid}.jsonl python3 scripts/bench_serve.py --real --servers speculative,plain,control
    python3 scripts/step_log_report.py /tmp/steps-*.jsonl

Per log (one server process), per load (streams in a step): the plain steps (one row a stream) with the median
target pass and the median of the step's own Python, the steps that drafted with their tokens and seconds, and the
prompt passes of the target and of the draft model. Two servers' plain steps at the same load are the same passes:
their medians side by side show what the process itself costs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict


def report(path: str) -> list[str]:
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short when the server was killed
    steps = [e for e in events if e.get("kind") == "step"]
    lines = [f"{path}: {len(steps)} steps, {sum(e['tokens'] for e in steps)} tokens"]
    by_load = defaultdict(list)
    for e in steps:
        by_load[e["streams"]].append(e)
    for streams, group in sorted(by_load.items()):
        plain = [e for e in group if e["rows"] == 1]
        drafting = [e for e in group if e["rows"] > 1]
        line = f"  {streams} streams: {len(plain)} plain steps"
        if plain:
            line += (f", target pass median {1000 * statistics.median(e['target_s'] for e in plain):.2f} ms,"
                     f" python {1000 * statistics.median(e['python_s'] for e in plain):.3f} ms")
        if drafting:
            line += (f"; {len(drafting)} drafting steps, {sum(e['tokens'] for e in drafting)} tokens in"
                     f" {sum(e['draft_s'] + e['target_s'] + e['python_s'] for e in drafting):.2f} s")
        lines.append(line)
    for kind in ("prompt", "draft_prompt"):
        passes = [e for e in events if e.get("kind") == kind]
        if passes:
            lines.append(f"  {kind} passes: {len(passes)}, {sum(e['tokens'] for e in passes)} tokens in "
                         f"{sum(e['seconds'] for e in passes):.2f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="step logs (JSON lines)")
    args = ap.parse_args()
    for path in args.logs:
        try:
            print("\n".join(report(path)))
        except OSError as e:
            sys.exit(f"{path}: {e.strerror or e}")


if __name__ == "__main__":
    main()
