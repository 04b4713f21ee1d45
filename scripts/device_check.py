#!/usr/bin/env python3
"""One prepared measurement of any llama.cpp backend (CUDA, Metal, CPU), through dspark's own classes.

    python3 scripts/device_check.py --out device.json            # Qwen2.5-7B- and 0.5B-shaped models
    python3 scripts/device_check.py --tiny --out tiny.json       # small shapes: a CPU check in seconds

It writes random-weight GGUF models of real shapes (a 7B target as Q4_K_M-like Q4_K/Q6_K and as Q8_0, a
0.5B draft as Q8_0; their vocabularies 152,064 and 151,936 tokens as the real ones), quantized blocks written
directly so nothing has to be quantized on the machine. Then it measures: the one-token decode, the verify
cost curve for 1-16 tokens, a draft step, the 512-token prefill, and what dspark's cost model would choose
with those costs at acceptance 0.6 / 0.8 / 0.9; dspark's exactness proof per verify size (llama/proof.py: does
every row of a batch of n tokens equal one-token decoding, bit for bit?); and a correctness run with the target
as its own draft (acceptance 1, so every verify batch is full): greedy speculative output against the target
alone, with the engine's default bound and with the proven one (what --exact uses).
Random weights say nothing about acceptance and everything about costs; the JSON says so too.
Everything goes into one JSON file (--out): figures, backend, device, versions. No network is needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name: (n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab)
SHAPES = {
    "target": (28, 3584, 18944, 28, 4, 152064),  # Qwen2.5-7B
    "draft": (24, 896, 4864, 14, 2, 151936),  # Qwen2.5-0.5B
}
TINY = {
    "target": (4, 512, 1536, 8, 2, 8192),
    "draft": (2, 128, 384, 4, 2, 8192 - 64),
}
# ggml type: (values per block, bytes per block)
Q4_K, Q6_K, Q8_0, F32 = 12, 14, 8, 0
BLOCK = {Q4_K: (256, 144), Q6_K: (256, 210), Q8_0: (32, 34)}


def _blocks(kind: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid quantized blocks with small random weights: random quants, a fixed small scale. One random row
    of blocks is tiled over the matrix (cheap to make for billions of weights; costs are all that matter)."""
    per, size = BLOCK[kind]
    n = cols // per
    row = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if kind == Q8_0:
        row[:, 0:2] = d
    elif kind == Q4_K:
        row[:, 0:2] = d
        row[:, 2:4] = 0  # dmin
        row[:, 4:16] = 0x11  # 6-bit scales and mins, small
    elif kind == Q6_K:
        row[:, 192:208] = 1  # int8 scales
        row[:, 208:210] = d
    return np.tile(row.reshape(1, n * size), (rows, 1))


def write_model(path: Path, shape, quant: str, seed: int) -> Path:
    import gguf

    n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab = shape
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"dspark-device-check-{quant}")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(15 if quant == "Q4_K_M" else 7)  # LLAMA_FTYPE_MOSTLY_Q4_K_M / Q8_0
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n_vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i + 1) for i in range(n_vocab - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    main = Q4_K if quant == "Q4_K_M" else Q8_0
    big = Q6_K if quant == "Q4_K_M" else Q8_0  # Q4_K_M keeps the output matrix and some ffn_down at Q6_K

    def add(name, kind, rows, cols):
        if kind == F32:
            w.add_tensor(name, np.ones(cols, dtype=np.float32))
        else:
            w.add_tensor(name, _blocks(kind, rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType(kind))

    add("token_embd.weight", big, n_vocab, n_embd)
    add("output_norm.weight", F32, 1, n_embd)
    add("output.weight", big, n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", F32, 1, n_embd)
        add(p + "attn_q.weight", main, n_embd, n_embd)
        add(p + "attn_k.weight", main, n_head_kv * head_dim, n_embd)
        add(p + "attn_v.weight", big, n_head_kv * head_dim, n_embd)
        add(p + "attn_output.weight", main, n_embd, n_embd)
        add(p + "ffn_norm.weight", F32, 1, n_embd)
        add(p + "ffn_gate.weight", main, n_ff, n_embd)
        add(p + "ffn_up.weight", main, n_ff, n_embd)
        add(p + "ffn_down.weight", big if i % 3 == 0 else main, n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, tokens: list[int], reps: int, max_batch: int) -> dict:
    """Through dspark's Model: one-token decode, the verify curve (n tokens, all logits), 512-token prefill."""
    base = 64
    model.truncate(0)
    model.sync(tokens[:base], n_logits=0)

    def step(n):
        def run():
            model.eval(tokens[base : base + n], n_logits=n)
            model.truncate(base)
        return run

    step(1)()  # warm-up
    curve = {n: timed(step(n), reps) for n in range(1, max_batch + 1)}

    def prefill():
        model.truncate(0)
        model.sync(tokens[:512], n_logits=1)

    prefill()
    t = timed(prefill, max(1, reps // 2))
    model.truncate(0)
    return {"decode_ms": round(curve[1] * 1e3, 3), "verify_ms": {n: round(v * 1e3, 3) for n, v in curve.items()},
            "verify_over_decode": {n: round(v / curve[1], 3) for n, v in curve.items()},
            "prefill_512_tok_s": round(512 / t, 1)}


def exactness(model, max_batch: int) -> dict:
    """dspark's proof at load (llama/proof.py) on this device: per verify size, whether every row's logits equal
    one-token decoding's bit for bit (true) or the largest difference; the bound --exact would use; its cost."""
    from dspark_cli.llama.proof import prove

    verdict = prove(model, max_batch)
    by_size = {n: (True if n not in verdict.differ else verdict.differ[n]) for n in range(2, verdict.checked + 1)}
    return {**verdict.as_dict(), "by_size": by_size, "seconds": round(verdict.seconds, 3)}


def choices(target_fig: dict, draft_fig: dict, draft_max: int) -> dict:
    """What dspark's cost model picks with these costs, at a few acceptance rates."""
    from dspark_cli.engine.costs import SOURCE_MODEL, Planner

    out = {}
    for alpha in (0.6, 0.8, 0.9):
        p = Planner(draft_max, has_model=True, has_free=False)
        for _ in range(8):
            for n, ms in target_fig["verify_ms"].items():
                if n <= draft_max + 1:
                    p.costs.record_verify(n, ms / 1e3)
            p.costs.record_draft(draft_fig["decode_ms"] / 1e3)
        acc = p.acceptance[SOURCE_MODEL]
        for i in range(400):  # evidence of acceptance alpha at every position
            n = 0
            while n < draft_max and (i * 7919 + n * 104729) % 1000 < alpha * 1000:
                n += 1
            acc.record(draft_max, n)
        plan = p.plan({}, 0)
        out[str(alpha)] = {"source": plan.source or "none", "k": plan.k,
                           "predicted_speedup": round(plan.rate * target_fig["decode_ms"] / 1e3, 3)}
    return out


def identity(target_path: Path, ngl: int, n_ctx: int, max_tokens: int, verify_max: int | None = None) -> dict:
    """Greedy: the target alone, then the target drafting for itself (acceptance 1: full verify batches), with
    verify batches of at most verify_max tokens (None: the engine's default bound here)."""
    from dspark_cli.engine.drafters import ModelDrafter
    from dspark_cli.engine.loop import generate
    from dspark_cli.llama.model import Model

    target = Model(target_path, role="target", n_ctx=n_ctx, n_gpu_layers=ngl)
    draft = Model(target_path, role="draft", n_ctx=n_ctx, n_gpu_layers=ngl)
    try:
        prompt = target.tokenize("w1 w2 w3 w4 w5 w6 w7 w8", add_special=True)
        alone = [e.token for e in generate(target, prompt, max_tokens=max_tokens) if e.token is not None]
        spec_events = list(generate(target, prompt, drafter=ModelDrafter(draft), max_tokens=max_tokens, draft_max=8,
                                    fixed=True, verify_max=verify_max))
        spec = [e.token for e in spec_events if e.token is not None]
        st = spec_events[-1].stats
        first = next((i for i, (a, b) in enumerate(zip(alone, spec)) if a != b), None)
        return {"identical": alone == spec, "tokens": len(alone), "first_difference": first,
                "acceptance_rate": round(st.acceptance_rate, 4), "tokens_per_step": round(st.tokens_per_step, 3),
                "speculative_tok_s": round(st.tokens_per_second, 2)}
    finally:
        draft.close()
        target.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU, seconds)")
    ap.add_argument("--out", default="device_check.json")
    ap.add_argument("--ngl", type=int, default=None, help="layers offloaded (default: all with a GPU backend)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--workdir", help="where the models are written (default: a temporary directory)")
    args = ap.parse_args()

    import llama_cpp

    from dspark_cli.llama.machine import gpu_summary, llama_info
    from dspark_cli.llama.model import Model

    gpu = gpu_summary()
    ngl = args.ngl if args.ngl is not None else (999 if gpu.get("offload") else 0)
    shapes = TINY if args.tiny else SHAPES
    result: dict = {
        "note": "random weights: acceptance figures mean nothing, costs everything",
        "shapes": {"tiny": args.tiny, **{k: dict(zip(("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab"), v))
                                         for k, v in shapes.items()}},
        "backend": gpu.get("backend"), "devices": gpu.get("devices"), "n_gpu_layers": ngl,
        "versions": {"python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
                     **{k: v for k, v in llama_info().items() if k in ("ggml_version", "ggml_commit", "dspark_patches")}},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        files = {
            "target_q4_k_m": write_model(tmp / "target-q4_k_m.gguf", shapes["target"], "Q4_K_M", 1),
            "target_q8_0": write_model(tmp / "target-q8_0.gguf", shapes["target"], "Q8_0", 2),
            "draft_q8_0": write_model(tmp / "draft-q8_0.gguf", shapes["draft"], "Q8_0", 3),
        }
        result["write_seconds"] = round(time.perf_counter() - t_start, 1)
        figures = {}
        for name, path in files.items():
            model = Model(path, role=name, n_ctx=2048, n_gpu_layers=ngl)
            try:
                tokens = list(range(300, 300 + 600))
                figures[name] = {"file_bytes": path.stat().st_size, **measure(model, tokens, args.reps, args.max_batch)}
                if name.startswith("target"):
                    figures[name]["exact"] = exactness(model, args.max_batch)
            finally:
                model.close()
            exact = figures[name].get("exact", {}).get("label", "-")
            print(f"device_check: {name}: decode {figures[name]['decode_ms']} ms, verify 8 "
                  f"{figures[name]['verify_ms'][8]} ms, prefill {figures[name]['prefill_512_tok_s']} tok/s, "
                  f"exact: {exact}", file=sys.stderr, flush=True)
        result["figures"] = figures
        result["draft_step_over_target_step"] = round(figures["draft_q8_0"]["decode_ms"]
                                                      / figures["target_q4_k_m"]["decode_ms"], 3)
        result["cost_model_choice"] = {t: choices(figures[t], figures["draft_q8_0"], 8)
                                       for t in ("target_q4_k_m", "target_q8_0")}
        result["identity"] = identity(files["target_q4_k_m"], ngl, 1024, 64 if args.tiny else 128)
        # What --exact does here: verify batches held to the largest size the proof found exact (1: none drafted).
        bound = figures["target_q4_k_m"]["exact"]["bound"]
        result["identity_exact"] = {"verify_max": bound, **identity(files["target_q4_k_m"], ngl, 1024,
                                                                    64 if args.tiny else 128, verify_max=bound)}
        result["exact"] = {t: figures[t]["exact"]["label"] for t in ("target_q4_k_m", "target_q8_0")}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("backend", "draft_step_over_target_step", "cost_model_choice", "identity",
                                             "identity_exact", "exact", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
