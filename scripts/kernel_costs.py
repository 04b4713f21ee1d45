#!/usr/bin/env python3
"""What the CPU kernels cost and whether they keep verify batches exact, per GGUF file, dspark's build beside
stock llama.cpp's, all through dspark's own Model class.

    python3 scripts/kernel_costs.py MODEL.gguf [MODEL.gguf ...]            # dspark's build vs stock
    python3 scripts/kernel_costs.py --stock-lib DIR --reps 5 MODEL.gguf
    python3 scripts/kernel_costs.py --decode-only --reps 20 MODEL.gguf      # one-token decoding, many short runs

For each file and build: the one-token decode (ms), verify batches of 2..16 tokens (ms, and x the one-token
cost), the 512-token prefill rate (tok/s), and whether every row of every verify batch has logits bit-identical
to decoding those tokens one at a time (the max difference when not). "stock" is llama.cpp with its own fast
paths (llamafile sgemm, repacked weights), built by scripts/build_llama_speculative.sh and loaded through
LLAMA_CPP_LIB_PATH; each build runs in its own process, the builds alternate per rep, and the figures are
medians. Kernel gains only: no drafting, no engine.

--decode-only times one-token decoding alone (a process of a few seconds per build and rep) and gives the median,
minimum and maximum of the per-rep speed ratios: on a shared machine the memory bus is sometimes loaded by other
tenants for minutes, which slows some kernels more than others, so a figure needs many alternating reps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCHES = list(range(2, 17))


def prompt_tokens(n: int) -> list[int]:
    """n ordinary tokens (ids 1000-4999, spread out): the same text for every build."""
    return [1000 + (i * 7919) % 4000 for i in range(n)]


def one_token_steps(m, tokens: list[int]) -> tuple[list[float], list]:
    """Decode tokens one at a time: the seconds of each step and a copy of its logits (the model reuses its
    buffer)."""
    import numpy as np

    times, rows = [], []
    for t in tokens:
        t0 = time.perf_counter()
        rows.append(np.array(m.eval([t], n_logits=1)[-1]))
        times.append(time.perf_counter() - t0)
    return times, rows


def measure(path: str, threads: int | None, positions: int) -> dict:
    """In this process, with whichever llama.cpp it loaded."""
    import numpy as np

    from dspark_cli.llama.model import Model

    m = Model(path, role="target", n_ctx=2048, n_batch=512, n_threads=threads)
    prompt = prompt_tokens(positions)
    out = {}
    m.eval(prompt[:512], n_logits=1)  # warm: weights paged in
    m.truncate(0)
    start = time.perf_counter()
    m.eval(prompt[:512], n_logits=1)
    out["prefill_512_tok_s"] = 512 / (time.perf_counter() - start)
    m.truncate(64)
    base = 64
    tail = prompt[base:base + 16]
    one, rows = one_token_steps(m, tail)  # one token at a time: the reference logits
    out["decode_ms"] = 1000 * statistics.median(one)
    m.truncate(base)
    verify, worst = {}, 0.0
    for k in BATCHES:
        times = []
        for rep in range(3):
            t0 = time.perf_counter()
            logits = m.eval(tail[:k], n_logits=k)
            times.append(time.perf_counter() - t0)
            if rep == 0:
                worst = max(worst, float(max(np.abs(np.array(logits[i]) - rows[i]).max() for i in range(k))))
            m.truncate(base)
        verify[k] = 1000 * statistics.median(times)
    out["verify_ms"] = verify
    out["identical"] = worst == 0.0
    out["max_abs_diff"] = worst
    m.close()
    return out


def measure_decode(path: str, threads: int | None) -> dict:
    """One-token decoding only: 40 tokens after a 64-token prompt, the first 4 left out (warm-up)."""
    from dspark_cli.llama.model import Model

    m = Model(path, role="target", n_ctx=1024, n_batch=512, n_threads=threads)
    tokens = prompt_tokens(104)
    m.eval(tokens[:64], n_logits=1)
    times, _ = one_token_steps(m, tokens[64:])
    m.close()
    return {"decode_ms": 1000 * statistics.median(times[4:])}


def child(args) -> None:
    got = measure_decode(args.child, args.threads) if args.decode_only else measure(args.child, args.threads, 600)
    print(json.dumps(got))


def lib_env(lib: str | None) -> dict:
    """This process's environment for a child that loads llama.cpp from lib (None: the installed build)."""
    env = dict(os.environ)
    if lib:
        # LD_LIBRARY_PATH too: libllama finds libggml* through its build's RUNPATH, not beside itself, so a copied
        # lib directory would otherwise run the kernels of whatever its build directory holds now
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    else:
        env.pop("LLAMA_CPP_LIB_PATH", None)
    return env


def run_build(model: str, lib: str | None, threads: int | None, decode_only: bool = False) -> dict:
    env = lib_env(lib)
    cmd = [sys.executable, __file__, "--child", model] + (["--threads", str(threads)] if threads else [])
    cmd += ["--decode-only"] if decode_only else []
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"kernel_costs: {model} with {lib or 'dspark'}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median_of(results: list[dict]) -> dict:
    return {
        "decode_ms": statistics.median(r["decode_ms"] for r in results),
        "prefill_512_tok_s": statistics.median(r["prefill_512_tok_s"] for r in results),
        "verify_ms": {k: statistics.median(r["verify_ms"][str(k)] for r in results) for k in BATCHES},  # JSON keys
        "identical": all(r["identical"] for r in results),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
    }


def decode_report(got: dict[str, list[dict]]) -> dict:
    """Per build: the median, fastest and slowest rep; and dspark's speed against stock's in the same rep."""
    out = {}
    for b, runs in got.items():
        ms = [r["decode_ms"] for r in runs]
        out[b] = {"decode_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
    if "stock" in got:
        ratios = [s["decode_ms"] / d["decode_ms"] for s, d in zip(got["stock"], got["dspark"])]
        out["dspark"].update(speed_median=statistics.median(ratios), speed_min=min(ratios), speed_max=max(ratios))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--stock-lib", default=str(Path.home() / ".cache/dspark/llama.cpp-0.3.36/build/bin"),
                    help="folder with stock llama.cpp's shared libraries (scripts/build_llama_speculative.sh)")
    ap.add_argument("--dspark-lib", help="another dspark build's libraries (default: the installed one)")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="time one-token decoding alone (see above)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    builds = {"dspark": args.dspark_lib} if args.no_stock else {"dspark": args.dspark_lib, "stock": args.stock_lib}
    report = {}
    for model in args.models:
        got = {b: [] for b in builds}
        for rep in range(args.reps):
            order = list(builds) if rep % 2 == 0 else list(builds)[::-1]
            for b in order:
                got[b].append(run_build(model, builds[b], args.threads, args.decode_only))
        report[model] = decode_report(got) if args.decode_only else {b: median_of(v) for b, v in got.items()}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    if args.decode_only:
        for model, per in report.items():
            print(f"\n{Path(model).name}")
            for b, r in per.items():
                spread = f"  speed vs stock per rep: median {r['speed_median']:.3f}x, {r['speed_min']:.3f}-" \
                         f"{r['speed_max']:.3f}x" if "speed_median" in r else ""
                print(f"{b:<8}decode ms: median {r['decode_ms']:.2f}, {r['min_ms']:.2f}-{r['max_ms']:.2f}{spread}")
        return
    for model, per in report.items():
        print(f"\n{Path(model).name}")
        print(f"{'build':<8}{'decode ms':>10}{'prefill t/s':>12}{'V2/V1':>7}{'V4/V1':>7}{'V8/V1':>7}{'V9/V1':>7}"
              f"{'V16/V1':>8}  exact")
        for b, r in per.items():
            v, d = r["verify_ms"], r["decode_ms"]
            print(f"{b:<8}{d:>10.2f}{r['prefill_512_tok_s']:>12.1f}{v[2]/d:>7.2f}{v[4]/d:>7.2f}{v[8]/d:>7.2f}"
                  f"{v[9]/d:>7.2f}{v[16]/d:>8.2f}  {r['identical']} (max diff {r['max_abs_diff']:.3g})")
        if "stock" in per:
            s, o = per["stock"], per["dspark"]
            print(f"dspark/stock: decode speed {s['decode_ms']/o['decode_ms']:.2f}x, prefill "
                  f"{o['prefill_512_tok_s']/s['prefill_512_tok_s']:.2f}x, V8 speed {s['verify_ms'][8]/o['verify_ms'][8]:.2f}x")


if __name__ == "__main__":
    main()
