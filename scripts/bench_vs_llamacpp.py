#!/usr/bin/env python3
"""dspark against the target alone and against llama.cpp's own `llama-speculative-simple`, interleaved.

    python3 scripts/bench_vs_llamacpp.py --real              # the real pair (scripts/fetch_real_pair.py)
    python3 scripts/bench_vs_llamacpp.py                     # the demo pair
    python3 scripts/bench_vs_llamacpp.py --target T.gguf --draft D.gguf --rounds 5

Contenders, all greedy, on the same prompts and settings (code, prose, summarization, and an input-heavy
edit), every one warmed up first, then each round runs them all back to back on each prompt, in an order
that rotates every round:
  target alone          dspark with no draft (dspark's batch-invariant kernels)
  target alone, stock   the same through llama.cpp's stock kernels (the llama.cpp the llama-speculative-simple
                        build compiled, loaded through LLAMA_CPP_LIB_PATH): the kernel gain, shown apart
  dspark hybrid         the default with a draft model: the cost model, draft model + prompt lookup
  dspark draft          the draft model alone (--no-lookup)
  dspark lookup         prompt lookup alone (-d lookup)
  dspark fixed K        the draft model drafting --fixed-k tokens every step (--draft-fixed: no cost model)
  llama-spec-simple K   `llama-speculative-simple --spec-type draft-simple --spec-draft-n-max K` per K
Speed is generation only (prompt processing and loading excluded for all; llama.cpp's own "decoded N tokens
in T s" line). Per prompt, each contender's speedup is the median over rounds of its ratio to the target
alone *in the same round* ("paired"), which cancels the machine drifting between rounds. The best
llama-speculative-simple length is then measured again in a fresh round, and that second figure is the one
compared with. dspark's outputs must equal the target alone's token for token.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dspark_cli.models.demo import demo_pair  # noqa: E402
from dspark_cli.engine.drafters import HybridDrafter, ModelDrafter, PromptLookupDrafter  # noqa: E402
from dspark_cli.engine.loop import generate  # noqa: E402
from dspark_cli.llama.model import Model  # noqa: E402
from dspark_cli.prompt import ChatTemplate, build_prompt  # noqa: E402
from kernel_costs import lib_env  # noqa: E402

_TYPOS = (
    "Fix the typos in the following text. Reply with the corrected text only.\n\n"
    "The quick development of small language models has changed how people think about running AI on their own "
    "computers. A few years ago, a model that could write a reasonable paragraph needed a data center; today a "
    "laptop can do it in seconds. This shift has many consequences. Developers can build tools that work offline, "
    "protect user privacy, and cost nothing to run once the model is downloded. Students can experiment with models "
    "without paying for expensive cloud accounts. Researchers can study model behaviour in detail, changing one "
    "thing at a time and measuring the effect. Of course, small models are not as capable as the largest ones, and "
    "they make more mistakes on hard problems. But for many everyday tasks, like summarizing a document, fixing "
    "grammer, or writing a short email, they are more then good enough. The most important question is no longer "
    "wether a local model can do the job, but how to make it fast and pleasent to use."
)
_PASSAGE = (
    "The Bell Rock Lighthouse, off the coast of Angus, Scotland, is the world's oldest surviving sea-washed "
    "lighthouse. It was built between 1807 and 1810 by Robert Stevenson on the Bell Rock, a reef that is covered by "
    "the sea at high tide. Work could only be done for a few hours at low water in summer, so the stones were cut "
    "and fitted together on shore first, then shipped out and set in place with dovetail joints. The light was "
    "first lit on 1 February 1811 and has warned ships off the reef ever since; it was automated in 1988. The "
    "tower is 35 metres tall and its light can be seen from 35 miles away. Its construction was described by "
    "Stevenson in a book published in 1824, and the engineering of the dovetailed granite courses was copied for "
    "lighthouses around the world."
)
PROMPTS = {  # id: (prompt, tokens to generate)
    "code": ("Write a Python function that parses a CSV file and returns the rows as a list of dictionaries. "
             "Include a docstring and a short usage example.", 200),
    "prose": ("Write a short story about a robot learning to paint.", 200),
    "summarize": (f"Summarize the following text in three sentences.\n\n{_PASSAGE}", 200),
    "edit": (_TYPOS, 260),
}


def dspark_once(target: Model, drafter, tokens: list[int], n: int, **kw):
    target.truncate(0)  # fresh KV state in both models: no run reuses another's prompt
    if drafter is not None and drafter.model is not None:
        drafter.model.truncate(0)
    out, last = [], None
    for ev in generate(target, tokens, drafter=drafter, max_tokens=n, **kw):
        if ev.token is not None:
            out.append(ev.token)
        last = ev
    return last.stats.tokens_per_second, out, last.stats


_STOCK = """
import json, sys
from dspark_cli.engine.loop import generate
from dspark_cli.llama.model import Model
t = Model(sys.argv[1], role="target", n_ctx=int(sys.argv[2]))
tokens = json.loads(sys.argv[3])
for n in (16, int(sys.argv[4])):  # a warm-up, then the timed one
    t.truncate(0)
    out = [e for e in generate(t, tokens, max_tokens=n)]
print(json.dumps({"tps": out[-1].stats.tokens_per_second, "tokens": [e.token for e in out if e.token is not None]}))
"""


def stock_once(libdir: Path, target: Path, tokens: list[int], n: int, ctx: int):
    """The target alone through stock llama.cpp kernels: llama-cpp-python loaded over the stock build."""
    env = {**lib_env(libdir), "DSPARK_FAST_KERNELS": "1"}
    r = subprocess.run([sys.executable, "-c", _STOCK, str(target), str(ctx), json.dumps(tokens), str(n)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"the stock-kernel run failed:\n{r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["tps"], got["tokens"]


def llama_once(binary: Path, target: Path, draft: Path, prompt_text: str, n: int, draft_max: int, ctx: int):
    cmd = [str(binary), "-m", str(target), "-md", str(draft), "-p", prompt_text, "-n", str(n), "--temp", "0",
           "-c", str(ctx), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_max)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", r.stdout)
    acc = re.search(r"accept\s+=\s+([\d.]+)%", r.stdout)
    if not m:
        sys.exit(f"could not parse llama-speculative-simple output:\n{r.stdout[-2000:]}")
    return float(m.group(3)), float(acc.group(1)) / 100 if acc else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="the real pair (Qwen2.5-Coder 0.5B -> 1.5B, Q4_K_M)")
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="which prompts: " + ", ".join(PROMPTS))
    ap.add_argument("-n", type=int, help="tokens to generate (default: per prompt, 200 or 260)")
    ap.add_argument("--draft-max", type=int, default=8, help="dspark's cap on the draft length")
    ap.add_argument("--fixed-k", type=int, default=4, help="the fixed draft length contender (0: none)")
    ap.add_argument("--llama-draft-max", default="2,4,8", help="llama-speculative-simple draft lengths")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp's contenders (no build needed)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--llama-bin", help="directory with llama-speculative-simple and the stock libraries "
                                        "(default: scripts/build_llama_speculative.sh builds them)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    if args.real:
        from fetch_real_pair import real_pair

        target_path, draft_path = real_pair()
    elif args.target:
        target_path, draft_path = Path(args.target), Path(args.draft)
    else:
        target_path, draft_path = demo_pair()
    bindir = None
    if not args.no_llama:
        if args.llama_bin:
            bindir = Path(args.llama_bin)
        else:
            here = Path(__file__).resolve().parent
            bindir = Path(subprocess.run(["bash", str(here / "build_llama_speculative.sh")], check=True,
                                         stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    prompt_ids = [p.strip() for p in args.prompts.split(",") if p.strip()]

    target = Model(target_path, role="target", n_ctx=args.ctx)
    draft = Model(draft_path, role="draft", n_ctx=args.ctx)
    dspark_contenders = {  # name: (drafter factory, generate options)
        "target alone": (lambda: None, {}),
        "dspark hybrid": (lambda: HybridDrafter(draft), {"draft_max": args.draft_max}),
        "dspark draft": (lambda: ModelDrafter(draft), {"draft_max": args.draft_max}),
        "dspark lookup": (lambda: PromptLookupDrafter(), {"draft_max": args.draft_max}),
    }
    if args.fixed_k:
        dspark_contenders[f"dspark fixed {args.fixed_k}"] = (lambda: ModelDrafter(draft),
                                                             {"draft_max": args.fixed_k, "fixed": True})
    llama_dms = [int(x) for x in args.llama_draft_max.split(",")] if bindir else []
    names = list(dspark_contenders) + (["target alone, stock kernels"] if bindir else []) + \
        [f"llama-spec-simple {d}" for d in llama_dms]

    prompts = {}
    template = ChatTemplate(target)
    for pid in prompt_ids:
        text, n = PROMPTS[pid]
        tokens, _ = build_prompt(target, text)
        prompts[pid] = (tokens, template.render([{"role": "user", "content": text}]).text, args.n or n)

    def run_one(name: str, pid: str):
        """(tokens per second, acceptance or None, output tokens or None)"""
        tokens, rendered, n = prompts[pid]
        if name in dspark_contenders:
            make, kw = dspark_contenders[name]
            tps, out, st = dspark_once(target, make(), tokens, n, **kw)
            return tps, (st.acceptance_rate if st.n_drafted else None), out, st.draft_lengths
        if name == "target alone, stock kernels":
            tps, out = stock_once(bindir, target_path, tokens, n, args.ctx)
            return tps, None, out, None
        d = int(name.rsplit(" ", 1)[1])
        tps, acc = llama_once(bindir / "llama-speculative-simple", target_path, draft_path, rendered, n, d, args.ctx)
        return tps, acc, None, None

    print(f"target {target_path.name}, draft {draft_path.name}; warming up every contender", file=sys.stderr)
    for name in names:  # first-touch page faults, thread pools, allocator growth: on nobody's clock
        run_one(name, prompt_ids[0])

    tps: dict[tuple[str, str], list[float]] = {}
    acc: dict[tuple[str, str], list[float]] = {}
    lengths: dict[tuple[str, str], list] = {}
    identical = True
    t0 = time.time()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for pid in prompt_ids:
            outs = {}
            for name in order:
                v, a, out, dl = run_one(name, pid)
                tps.setdefault((name, pid), []).append(v)
                if a is not None:
                    acc.setdefault((name, pid), []).append(a)
                if dl is not None:
                    lengths.setdefault((name, pid), []).append(dl)
                outs[name] = out
            alone = outs["target alone"]
            identical &= all(o == alone for k, o in outs.items() if o is not None and k != "target alone, stock kernels")
            row = "  ".join(f"{k}={tps[(k, pid)][-1]:.1f}" for k in names)
            print(f"round {r + 1} {pid}: {row}", file=sys.stderr, flush=True)

    def paired(name: str, pid: str, ref: str = "target alone") -> float:
        return statistics.median(b / a for a, b in zip(tps[(ref, pid)], tps[(name, pid)]))

    confirm = None
    if llama_dms:
        # The best llama-speculative-simple length, measured again: a fresh round of it and the target alone.
        best = max((f"llama-spec-simple {d}" for d in llama_dms),
                   key=lambda k: statistics.median(paired(k, pid) for pid in prompt_ids))
        again = {}
        for pid in prompt_ids:
            a = run_one("target alone", pid)[0]
            b = run_one(best, pid)[0]
            again[pid] = b / a
        confirm = {"contender": best, "paired_speedup": again}

    result = {
        "target": str(target_path), "draft": str(draft_path), "rounds": args.rounds, "prompts": prompt_ids,
        "tokens": {pid: prompts[pid][2] for pid in prompt_ids}, "wall_seconds": round(time.time() - t0, 1),
        "identical_greedy_output": identical,
        "median_tokens_per_second": {name: {pid: round(statistics.median(tps[(name, pid)]), 2) for pid in prompt_ids}
                                     for name in names},
        "paired_speedup_vs_target_alone": {name: {pid: round(paired(name, pid), 3) for pid in prompt_ids}
                                           for name in names},
        "median_acceptance": {name: {pid: round(statistics.median(v), 3) for (n2, pid), v in acc.items() if n2 == name}
                              for name in names},
        "draft_lengths": {name: {pid: lengths[(name, pid)][0] for (n2, pid) in lengths if n2 == name}
                          for name in names if any(n2 == name for n2, _ in lengths)},
        "best_llama_spec_simple_measured_again": confirm,
        "all_runs": {f"{name} | {pid}": v for (name, pid), v in tps.items()},
    }
    if bindir:
        result["kernel_gain_target_alone"] = {pid: round(paired("target alone", pid, "target alone, stock kernels"), 3)
                                              for pid in prompt_ids}

    width = max(len(n) for n in names)
    print(f"\n{'speedup vs target alone (paired medians)':<{width}}  " + "  ".join(f"{p:>9}" for p in prompt_ids))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{result['paired_speedup_vs_target_alone'][name][p]:>8.2f}x"
                                               for p in prompt_ids))
    if confirm:
        print(f"{confirm['contender'] + ', again':<{width}}  "
              + "  ".join(f"{confirm['paired_speedup'][p]:>8.2f}x" for p in prompt_ids))
    print(f"{'target alone tok/s':<{width}}  " + "  ".join(
        f"{result['median_tokens_per_second']['target alone'][p]:>9.1f}" for p in prompt_ids))
    print(f"identical greedy output: {identical}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
