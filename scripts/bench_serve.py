#!/usr/bin/env python3
"""`dspark serve` under concurrent streaming clients: batched speculation against plain batching and against the
one-at-a-time speculative server, interleaved.

    python3 scripts/bench_serve.py                                   # demo pair, 1,2,4,8 clients, 3 rounds
    python3 scripts/bench_serve.py --real                            # the Qwen2.5-Coder pair (fetch_real_pair.py)
    python3 scripts/bench_serve.py --clients 4 --rounds 5 -- --target T.gguf --draft D.gguf
    python3 scripts/bench_serve.py --real --system 8                 # clients sharing a long system prompt

Three servers run side by side on loopback ports, each warmed up (the drafting memory off unless --memory: the
rounds repeat their questions, and a memory would replay its earlier answers to them):
  speculative   the default drafter, --parallel N (N: the most clients measured)
  plain         --draft none --parallel N: continuous batching without speculation
  one-at-a-time the default drafter, --parallel 1 (what dspark served before batching)
  control       (only with --servers) plain again: its ratio to plain is the machine's noise in this run
For each client count, each round sends the same C streaming chat requests (the official `openai` client, one
thread each, greedy; each request sent once the server holds the one before, so every server sees them arrive
in the same order) to every server in turn, in an order that rotates every round (`--servers` picks some of
them, e.g. `speculative,plain` for a plain A/B). Per request: time to first
token, tokens (from `usage`), tokens/s while streaming; per round: total tokens/s. Ratios are taken within a
round (the machine's speed drifts between rounds) and summarized by their median and range. Every answer is
checked against the one-at-a-time server's: batching must not change a token. The servers start one after another,
and the process started first runs its target passes slower than those started after it (2-18% slower than the
last one, in each of 6 rounds, whichever server it was; measured with DSPARK_STEP_LOG; it follows the process's
own memory, not dspark: README, "Serving many clients"), which rounds within the same processes cannot average
out. So for a claim between servers use --fresh: every server starts anew each round, in the rounds' rotating
order, and the spread over rounds includes that (and each server's learning). Without it the first server listed
starts first for the whole run.
--unproven gives every server an empty folder of exactness verdicts: it proves its target at load, as on a
target's first run (that once left a server's passes ~60% slower: README, "One team of workers").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works, step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "Give me a recipe for pancakes.",
    "What are the main causes of the French Revolution?",
    "Write a haiku about autumn, then explain it.",
    "Describe how HTTPS keeps a connection private.",
]
SERVERS = ("speculative", "plain", "one-at-a-time", "control")
DEFAULT_SERVERS = SERVERS[:3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra: list[str], proofs: str | None = None) -> tuple[subprocess.Popen, int]:
    """A server with `extra` options; proofs: its exactness verdicts' folder (an empty one: it proves at load)."""
    import urllib.request

    port = free_port()
    # Its log goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB: a few hundred requests' log lines in
    # a long run), and the server then blocks on its next line.
    log = tempfile.TemporaryFile()
    env = {**os.environ, "DSPARK_PROOFS": proofs} if proofs else None
    proc = subprocess.Popen([sys.executable, "-m", "dspark_cli", "serve", "--port", str(port), "--max-queue", "64",
                             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"a server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            time.sleep(0.3)
    sys.exit("a server did not start")


SYSTEM = ("You are the coding agent of a small team. Follow the repository's style guide, write a test for every "
          "change, explain each step briefly, never invent an API, and ask when a requirement is unclear. ")


def messages_for(i: int, tag: str, system_repeats: int) -> list[dict]:
    """Client i's chat. With system_repeats, a system prompt of that many copies of SYSTEM (an agent's long
    instructions) that the round's clients share, the round's tag first: new to every server in every round."""
    if not system_repeats:
        return [{"role": "user", "content": tag + PROMPTS[i % len(PROMPTS)]}]
    return [{"role": "system", "content": tag + SYSTEM * system_repeats},
            {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def one_round(port: int, clients: int, max_tokens: int, tag: str = "", system_repeats: int = 0) -> dict:
    """C clients at once; `tag` starts every prompt (a round's own, so no server answers from a cached prompt
    of an earlier round: a server keeping several slots' prompts would otherwise skip prefill that the others
    pay for)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
    model = client.models.list().data[0].id
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        try:
            _ask(i, time.perf_counter())
        finally:
            answered[i].set()  # (a failed request releases the next one too)

    def _ask(i: int, t0: float) -> None:
        first = None
        tokens = prompt = cached = 0
        text = []
        stream = client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=messages_for(i, tag, system_repeats))
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                if first is None:
                    first = time.perf_counter()
                    answered[i].set()
            if chunk.usage is not None:
                tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                cached = (details.cached_tokens or 0) if details is not None else 0
        end = time.perf_counter()
        results[i] = {"ttft": (first or end) - t0, "tokens": tokens, "prompt": prompt, "cached": cached,
                      "text": "".join(text),
                      "tok_s": tokens / (end - t0) if end > t0 else 0.0}

    answered = [threading.Event() for _ in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for i, t in enumerate(threads):
        t.start()
        # Each request in before the next is sent: the same arrival order in every server and round (the order
        # decides which slot, beside which cache, each prompt takes; left to racing threads it made the servers'
        # rounds differ by luck).
        while not answered[i].is_set() and held(port) < i + 1:
            time.sleep(0.002)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rs = [results[i] for i in sorted(results)]
    return {"completed": sum(1 for r in rs if r["tokens"] > 0), "wall": wall,
            "total_tok_s": sum(r["tokens"] for r in rs) / wall,
            "request_tok_s": statistics.median(r["tok_s"] for r in rs),
            "median_ttft": statistics.median(r["ttft"] for r in rs),
            "worst_ttft": max(r["ttft"] for r in rs),
            # prompt tokens no server pass processed (a cache held them: the slot's own, or another's copied)
            "cached_share": round(sum(r["cached"] for r in rs) / max(1, sum(r["prompt"] for r in rs)), 3),
            "texts": [r["text"] for r in rs]}


def stop_all(servers: dict) -> None:
    """Ctrl-C to every server, then wait for each to exit."""
    for proc, _ in servers.values():
        proc.send_signal(signal.SIGINT)
    for proc, _ in servers.values():
        proc.wait(timeout=60)
    servers.clear()


def health(port: int) -> dict:
    import urllib.request

    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30))


def held(port: int) -> int:
    """Requests the server holds now: generating or waiting for a slot."""
    h = health(port)
    return h.get("active", 0) + h.get("waiting", 0)


def wait_quiet(port: int) -> None:
    """Until the server generates nothing and settles no cache (a server re-processes finished answers while
    idle, see README "Exact whatever the cache held": that must not run beside another server's round)."""
    while True:
        h = health(port)
        if not h.get("active") and not h.get("settling"):
            return
        time.sleep(0.05)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,2,4,8", help="client counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, help="--parallel of the batching servers (default: the most clients)")
    ap.add_argument("--real", action="store_true", help="the Qwen2.5-Coder 0.5B -> 1.5B pair (scripts/fetch_real_pair.py)")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="which of speculative, plain, one-at-a-time, control to run (e.g. speculative,plain,control "
                         "for an A/B beside its noise floor)")
    ap.add_argument("--memory", action="store_true",
                    help="keep the drafting memory on (off by default: see below)")
    ap.add_argument("--system", type=int, default=0, metavar="N",
                    help="a shared system prompt of N copies of a 35-word instruction, new every round (0: none)")
    ap.add_argument("--fresh", action="store_true",
                    help="new server processes every round, started in the round's rotating order (the process "
                         "started first runs slower passes than the later ones: with --fresh every server takes "
                         "every place)")
    ap.add_argument("--unproven", action="store_true",
                    help="every server starts with an empty folder of exactness verdicts, so it proves its target at "
                         "load, as on a target's first run (with --fresh: every round)")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("serve_args", nargs="*", help="after --: options for every server (--target, --draft, ...)")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients: client counts, comma-separated (got {args.clients!r})")
    if min(counts) < 1 or args.rounds < 1 or args.max_tokens < 1 or args.system < 0 or (args.parallel or 1) < 1:
        ap.error("--clients, --rounds, --max-tokens and --parallel must be at least 1, --system at least 0")
    names = tuple(n for n in SERVERS if n in args.servers.split(","))
    if not names:
        sys.exit(f"--servers: choose from {', '.join(SERVERS)}")
    parallel = args.parallel or max(counts)

    common = list(args.serve_args)
    if args.real:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([sys.executable, os.path.join(here, "fetch_real_pair.py")], check=True,
                             capture_output=True, text=True).stdout.split()
        common += ["--target", out[0], "--draft", out[1]]
    if not args.memory:
        # Every round asks the same questions (and the client counts of a round share them), so with the drafting
        # memory on, a speculative server would draft each answer from its own earlier answer to the same
        # question: a replay no real load gets, which measures the memory, not serving (`dspark bench`'s
        # repetitive workload measures the memory). The plain server has no drafts at all.
        common += ["--draft-memory", "0"]
    alone = list(common)
    if "--draft" in alone:
        i = alone.index("--draft")
        del alone[i:i + 2]
    configs = {"speculative": common + ["--parallel", str(parallel)],
               "plain": alone + ["--draft", "none", "--parallel", str(parallel)],
               "one-at-a-time": common + ["--parallel", "1"]}
    configs["control"] = configs["plain"]
    servers = {}
    folders: list[str] = []  # --unproven: the servers' verdict folders, removed at the end

    def rotated(r: int) -> tuple[str, ...]:
        return names[r % len(names):] + names[:r % len(names)]

    def start_all(order: tuple[str, ...]) -> None:
        # Started (and warmed up) one after another, in `order`: --fresh rotates it every round, as the rounds'
        # order rotates, for the process started first runs slower passes than the later ones (module docstring).
        for name in order:
            proofs = tempfile.mkdtemp(prefix="dspark-proofs-") if args.unproven else None
            if proofs:
                folders.append(proofs)
            servers[name] = start(configs[name], proofs)
        for name in order:  # warm-up: weights paged in, threads spun up, graphs built
            one_round(servers[name][1], min(parallel, 4), 16)

    try:
        start_all(rotated(0))
        rows: dict[int, dict[str, list[dict]]] = {c: {name: [] for name in names} for c in counts}
        mismatches = 0
        for r in range(args.rounds):
            if args.fresh and r:
                stop_all(servers)
                start_all(rotated(r))
            for c in counts:
                order = rotated(r)
                got = {}
                for name in order:
                    for _, port in servers.values():  # every server quiet: none settles its caches meanwhile
                        wait_quiet(port)
                    got[name] = one_round(servers[name][1], c, args.max_tokens, tag=f"(Request {r}.{c}) ",
                                          system_repeats=args.system)
                    rows[c][name].append(got[name])
                    print(f"round {r + 1}, {c} clients, {name}: "
                          + json.dumps({k: round(v, 3) for k, v in got[name].items() if k != "texts"}),
                          file=sys.stderr, flush=True)
                if "speculative" in got:  # every answer against the first other server's (all must agree)
                    reference = got[next(n for n in names if n != "speculative")]["texts"] if len(names) > 1 else []
                    mismatches += sum(a != b for a, b in zip(got["speculative"]["texts"], reference))
    finally:
        stop_all(servers)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    summary: dict = {"settings": {"clients": counts, "rounds": args.rounds, "max_tokens": args.max_tokens,
                                  "parallel": parallel, "system": args.system, "fresh": args.fresh,
                                  "unproven": args.unproven,
                                  "serve_args": common},
                     "speculative_answers_differing": mismatches}
    print("\n| clients | server | total tok/s | per-request tok/s | median TTFT s | worst TTFT s "
          "| total vs one-at-a-time | total vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in counts:
        summary[c] = {}
        for name in names:
            rs = rows[c][name]
            vs_one = [a["total_tok_s"] / b["total_tok_s"] for a, b in zip(rs, rows[c].get("one-at-a-time", rs))]
            vs_plain = [a["total_tok_s"] / b["total_tok_s"] for a, b in zip(rs, rows[c].get("plain", rs))]
            summary[c][name] = {
                "total_tok_s": statistics.median(x["total_tok_s"] for x in rs),
                "request_tok_s": statistics.median(x["request_tok_s"] for x in rs),
                "median_ttft": statistics.median(x["median_ttft"] for x in rs),
                "worst_ttft": max(x["worst_ttft"] for x in rs),
                "vs_one_at_a_time": vs_one, "vs_plain": vs_plain,
                "completed": min(x["completed"] for x in rs)}
            s = summary[c][name]
            print(f"| {c} | {name} | {s['total_tok_s']:.1f} | {s['request_tok_s']:.1f} | {s['median_ttft']:.2f} "
                  f"| {s['worst_ttft']:.2f} | {spread(vs_one)} | {spread(vs_plain)} |")
    first = names[0]
    lone_ttft = summary[min(counts)][first]["median_ttft"]
    for c in counts:
        summary[c]["ttft_vs_lone"] = summary[c][first]["median_ttft"] / lone_ttft
    print(f"\nspeculative answers differing from the other server's: {mismatches}")
    print(f"{first}'s median TTFT vs the fewest clients': "
          + ", ".join(f"{c} clients {summary[c]['ttft_vs_lone']:.2f}x" for c in counts))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"summary": summary, "rounds": {c: v for c, v in rows.items()}}, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    main()
