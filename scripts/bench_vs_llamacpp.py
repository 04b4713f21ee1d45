#!/usr/bin/env python3
"""dspark vs the target alone vs llama.cpp's own `llama-speculative-simple`, interleaved in one run.

    python3 scripts/bench_vs_llamacpp.py                 # demo pair, 200 greedy tokens, 3 rounds
    python3 scripts/bench_vs_llamacpp.py --target T.gguf --draft D.gguf --rounds 5

Each round runs, back to back: dspark with the target alone, dspark speculative, and
llama-speculative-simple (built from the llama.cpp vendored in our llama-cpp-python by
scripts/build_llama_speculative.sh) at each of --llama-draft-max. Generation speed excludes model loading
and prompt processing for all of them (llama.cpp's own "decoded N tokens in T s" line). Medians per method
and the ratios are printed; --json PATH writes them. Greedy throughout, so outputs must be identical.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from dspark_cli.demo import demo_pair
from dspark_cli.drafters import ModelDrafter
from dspark_cli.engine import generate
from dspark_cli.model import Model
from dspark_cli.prompt import build_prompt, render_chat

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works, step by step.",
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
]


def dspark_once(target: Model, draft: Model | None, tokens: list[int], n: int, draft_max: int, p_min: float,
                overlap: bool | None = None):
    target.truncate(0)  # fresh KV state: no cache replay
    drafter = None
    if draft is not None:
        draft.truncate(0)
        drafter = ModelDrafter(draft, p_min=p_min)
    out, last = [], None
    for ev in generate(target, tokens, drafter=drafter, max_tokens=n, draft_max=draft_max, overlap=overlap):
        if ev.token is not None:
            out.append(ev.token)
        last = ev
    return last.stats.tokens_per_second, out, last.stats


def llama_once(binary: Path, target: Path, draft: Path, prompt_text: str, n: int, draft_max: int, ctx: int):
    cmd = [str(binary), "-m", str(target), "-md", str(draft), "-p", prompt_text, "-n", str(n), "--temp", "0",
           "-c", str(ctx), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_max)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", r.stdout)
    acc = re.search(r"accept\s+=\s+([\d.]+)%", r.stdout)
    if not m:
        sys.exit(f"could not parse llama-speculative-simple output:\n{r.stdout[-2000:]}")
    return float(m.group(3)), int(m.group(1)), float(acc.group(1)) / 100 if acc else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-max", default="6", help="dspark draft lengths to try, comma-separated")
    ap.add_argument("--engines", default="overlapped,sequential",
                    help="dspark engines to run: overlapped (the CPU default) and/or sequential")
    ap.add_argument("--draft-p-min", type=float, default=0.0)
    ap.add_argument("--llama-draft-max", default="3,8", help="llama-speculative-simple draft lengths to try")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--llama-bin", help="directory with llama-speculative-simple (default: build it)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    if args.target:
        target_path, draft_path = Path(args.target), Path(args.draft)
    else:
        target_path, draft_path = demo_pair()
    if args.llama_bin:
        bindir = Path(args.llama_bin)
    else:
        here = Path(__file__).resolve().parent
        bindir = Path(subprocess.run(["bash", str(here / "build_llama_speculative.sh")], check=True,
                                     stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    binary = bindir / "llama-speculative-simple"
    llama_dms = [int(x) for x in args.llama_draft_max.split(",")]

    target = Model(target_path, role="target", n_ctx=args.ctx)
    draft = Model(draft_path, role="draft", n_ctx=args.ctx)
    dspark_dms = [int(x) for x in args.draft_max.split(",")]
    runs: dict[str, list[float]] = {"target_alone": []}
    engines = {"overlapped": "dspark_overlap", "sequential": "dspark_seq"}
    variants = [(f"{engines[e]}_dm{d}", e == "overlapped", d) for e in args.engines.split(",") for d in dspark_dms]
    runs.update({name: [] for name, _, _ in variants})
    runs.update({f"llama_spec_simple_dm{d}": [] for d in llama_dms})
    accept: dict[str, list[float]] = {k: [] for k in runs}
    identical = True

    # Warm-up: page the weights in for every contender.
    toks0, _ = build_prompt(target, PROMPTS[0])
    dspark_once(target, draft, toks0, 16, dspark_dms[0], args.draft_p_min)
    dspark_once(target, None, toks0, 16, 1, 0.0)

    for r in range(args.rounds):
        for text in PROMPTS:
            tokens, _ = build_prompt(target, text)
            rendered = render_chat(target, [{"role": "user", "content": text}])
            tps_a, out_a, _ = dspark_once(target, None, tokens, args.n, 1, 0.0)
            runs["target_alone"].append(tps_a)
            for name, overlap, d in variants:
                tps_b, out_b, st = dspark_once(target, draft, tokens, args.n, d, args.draft_p_min, overlap)
                identical &= out_a == out_b
                runs[name].append(tps_b)
                accept[name].append(st.acceptance_rate)
            for d in llama_dms:
                tps_c, n_dec, acc = llama_once(binary, target_path, draft_path, rendered, args.n, d, args.ctx)
                runs[f"llama_spec_simple_dm{d}"].append(tps_c)
                if acc is not None:
                    accept[f"llama_spec_simple_dm{d}"].append(acc)
            line = "  ".join(f"{k}={v[-1]:.1f}" for k, v in runs.items())
            print(f"round {r + 1} prompt {PROMPTS.index(text) + 1}: {line}", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    best_llama = max((k for k in med if k.startswith("llama")), key=med.get)
    best_dspark = max((k for k in med if k.startswith("dspark")), key=med.get)
    result = {
        "target": str(target_path), "draft": str(draft_path), "n_tokens": args.n, "rounds": args.rounds,
        "prompts": PROMPTS, "best_dspark": best_dspark, "median_tokens_per_second": med,
        "median_acceptance": {k: statistics.median(v) for k, v in accept.items() if v},
        "speedup_vs_target_alone": {k: med[k] / med["target_alone"] for k in med if k.startswith("dspark")},
        # The same ratio taken within each back-to-back pair of runs, then the median: less exposed to the
        # machine's speed drifting between rounds than a ratio of medians.
        "paired_speedup_vs_target_alone": {
            k: statistics.median(b / a for a, b in zip(runs["target_alone"], runs[k])) for k in med if k.startswith("dspark")},
        "best_llama_spec_simple": best_llama,
        "speedup_vs_llama_spec_simple": {k: med[k] / med[best_llama] for k in med if k.startswith("dspark")},
        "llama_spec_simple_vs_target_alone": med[best_llama] / med["target_alone"],
        "identical_greedy_output": identical, "all_runs": runs,
    }
    print(json.dumps(result, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
