"""`dspark doctor`: this machine, the llama.cpp build, and (given models) whether they pair and fit, with advice.

The report goes to stdout. When it finds a problem (a model missing, a pair that does not match, not enough
memory) it still prints the whole report, then exits with that problem's one-line error and exit code.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..console import console, write_json
from ..errors import DsparkError, UsageError
from ..loader import ModelOptions
from ..llama.kernels import KERNEL_PATCHES
from . import _options as o

# A draft much over a fifth of the target's size costs too much per drafted token to pay off.
DRAFT_RATIO_WARN = 0.2


def kernel_advice(patches: list[str] | None, gpu_backend: str, cpu_features: list[str]) -> list[str]:
    """What the build's dspark kernels (patches: None = unknown, [] = stock) cost on a CPU-only machine."""
    if gpu_backend != "none" or patches is None or "avx2" not in cpu_features:
        return []
    if not patches:
        return ["this llama.cpp was built without dspark's CPU kernels: `bash scripts/install.sh` "
                "(without DSPARK_LLAMA_PATCHES=0) builds them in for faster verify batches"]
    missing = [name for name in KERNEL_PATCHES if name not in patches]
    if missing:
        return [f"this llama.cpp lacks newer dspark kernels ({'; '.join(f'{m}: {KERNEL_PATCHES[m]}' for m in missing)}): "
                "rerun `bash scripts/install.sh`"]
    return []


# Long: one check after another in the order doctor prints them (machine, build, models, pairing, memory);


# splitting it would scatter that order.


def diagnose(target: str | None, draft: str | None, pair: str | None, *, n_ctx: int, n_gpu_layers: int | None,
             n_gpu_layers_draft: int | None, offline: bool) -> tuple[dict, list[DsparkError]]:
    from ..llama.machine import machine_info

    info = machine_info()
    report: dict = {"machine": info, "models": None, "memory": None, "pairing": None, "profiles": [],
                    "derived_draft": None, "exactness": None, "advice": []}
    problems: list[DsparkError] = []
    advice: list[str] = report["advice"]
    gpu, cpu, llama = info["gpu"], info["cpu"], info["llama"]

    if llama.get("error"):
        advice.append(f"llama.cpp is unusable here: {llama['error']}")
    if gpu["backend"] == "none":
        advice.append("no GPU backend in this llama.cpp build: everything runs on the CPU, where a verify batch "
                      "costs more than one token, so gains are smaller; measure with `dspark bench`")
    advice += kernel_advice(llama.get("dspark_patches"), gpu["backend"], cpu["features"])
    compiled = set(llama.get("compiled_features") or [])
    if compiled:
        for feat, built in (("avx2", "avx2"), ("avx512f", "avx512")):
            if feat in cpu["features"] and built not in compiled:
                advice.append(f"this CPU has {feat.upper()} but llama.cpp was built without it: rebuild it for speed")

    if pair and (target or draft):
        raise UsageError("--pair sets both models; drop --target/--draft or drop --pair")
    if pair:
        from ..models.refs import resolve_pair

        target, draft = resolve_pair(pair)
    if not (target or draft):
        report["exactness"] = _exactness(llama, None)
        return report, problems

    from ..models.refs import resolve_model

    models: dict = {}
    paths = {}
    for role, ref in (("target", target), ("draft", draft)):
        if not ref:
            continue
        entry = {"ref": ref, "path": None}
        try:
            paths[role] = resolve_model(ref, pull=False, offline=offline)
            entry["path"] = str(paths[role])
            entry["size"] = paths[role].stat().st_size
        except DsparkError as e:
            entry["problem"] = e.message
            problems.append(e)
        models[role] = entry
    report["models"] = models

    offload = gpu.get("offload", False)
    ngl = n_gpu_layers if n_gpu_layers is not None else (999 if offload else 0)
    ngld = n_gpu_layers_draft if n_gpu_layers_draft is not None else ngl
    if offload and ngl == 0:
        advice.append(f"the {gpu['backend']} backend is there but no layers are offloaded: pass --n-gpu-layers 999")

    if "target" in paths:
        from ..llama.memory import fmt_bytes, plan

        try:
            p = plan(paths["target"], paths.get("draft"), n_ctx=n_ctx, n_gpu_layers=ngl, n_gpu_layers_draft=ngld,
                     ram_available=info["ram"]["available"], gpu=gpu)
        except DsparkError as e:
            problems.append(e)
        else:
            report["memory"] = p.to_dict()
            advice.extend(p.notes)
            if not p.fits:
                from ..llama.memory import preflight

                try:  # the same message `dspark run` would stop with
                    preflight(paths["target"], paths.get("draft"), n_ctx=n_ctx, n_gpu_layers=ngl,
                              n_gpu_layers_draft=ngld)
                except DsparkError as e:
                    problems.append(e)
            elif p.ram_needed > 0.8 * p.ram_available:
                advice.append(f"memory is tight: {fmt_bytes(p.ram_needed)} of {fmt_bytes(p.ram_available)} "
                              "available RAM; other programs may push the model out of memory")
            for role in ("target", "draft"):
                m = getattr(p, role)
                if m is not None:
                    models[role].update(arch=m.arch, n_layer=m.n_layer, n_vocab=m.n_vocab)

    if "target" in paths and "draft" in paths:
        t_size, d_size = models["target"]["size"], models["draft"]["size"]
        if d_size >= t_size:
            advice.append("the draft is as big as the target or bigger: it cannot make anything faster")
        elif d_size > DRAFT_RATIO_WARN * t_size:
            advice.append(f"the draft is {d_size / t_size:.0%} of the target's size: too big to gain much; "
                          "pick a smaller draft of the same family")
        report["pairing"] = _pairing(paths["target"], paths["draft"], problems)
    draft_file = paths.get("draft")  # the file a load uses: a derived copy when one is cached for this build
    if draft_file is not None and not llama.get("error") and (report["pairing"] or {}).get("ok"):
        from ..models.derive import stored_verdict

        report["derived_draft"], draft_file = stored_verdict(draft_file)
    if "target" in paths:
        from ..models.profiles import stored_profiles

        report["profiles"] = stored_profiles(paths["target"], draft_file)
    report["exactness"] = _exactness(llama, paths.get("target"))
    return report, problems


def _exactness(llama: dict, target) -> dict:
    """The build's exactness state, and the proof's verdicts kept for this build (for the target, when given)."""
    from ..llama.kernels import build_exactness

    state, words = build_exactness(llama.get("dspark_patches"))
    out = {"build": state, "detail": words, "proofs": []}
    if llama.get("error"):
        return out
    from ..llama.machine import build_id
    from ..models.proofs import stored_verdicts

    build = build_id()
    for found in stored_verdicts(target):
        key, verdict = found["key"], found["verdict"]
        if key.get("build") == build:
            out["proofs"].append({"file": key.get("file"), "device": key.get("device"), "threads": key.get("threads"),
                                  "seconds": found["seconds"], **verdict.as_dict()})
    return out


def _pairing(target, draft, problems: list[DsparkError]) -> dict:
    """How the draft's vocabulary relates to the target's: the same, padded, or another (then it drafts through
    text, engine/through_text.py). ok False only when a file cannot be read."""
    try:
        from ..llama.model import Model
        from ..llama.vocab import vocab_report
    except Exception as e:  # noqa: BLE001 - llama.cpp missing or broken: say so, do not crash the report
        return {"ok": None, "detail": f"cannot check: {type(e).__name__}: {e}"}
    try:
        vocabs = [Model(target, role="target", vocab_only=True)]
        try:
            vocabs.append(Model(draft, role="draft", vocab_only=True))
            report, through_text = vocab_report(*vocabs)
        finally:
            for vocab in vocabs:
                vocab.close()
    except DsparkError as e:
        problems.append(e)
        return {"ok": False, "detail": e.message}
    return {"ok": True, "detail": report, "through_text": through_text}


# Long: the report's rows in print order, one small block per row.


def _print(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..llama.memory import fmt_bytes

    out = console(width=None if sys.stdout.isatty() else max(console().width, 120), highlight=False)
    m = report["machine"]
    cpu, ram, llama, gpu = m["cpu"], m["ram"], m["llama"], m["gpu"]
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("OS", f"{m['os']}, Python {m['python']}")
    t.add_row("CPU", f"{cpu['model']} ({cpu['arch']}), {cpu['physical_cores']} cores / {cpu['logical_cores']} threads")
    t.add_row("CPU features", " ".join(cpu["features"]) or "none of interest")
    t.add_row("RAM", f"{fmt_bytes(ram['total'])} total, {fmt_bytes(ram['available'])} available")
    t.add_row("llama-cpp-python", str(llama.get("llama_cpp_python") or "not installed"))
    t.add_row("llama.cpp (ggml)", f"{llama.get('ggml_version') or '?'} commit {llama.get('ggml_commit') or '?'}")
    if llama.get("system_info"):
        t.add_row("llama.cpp build", llama["system_info"])
    patches = llama.get("dspark_patches")
    t.add_row("dspark kernels", ", ".join(patches) if patches else
              "none (stock llama.cpp)" if patches == [] else "unknown (not built by scripts/install.sh)")
    t.add_row("GPU backend", gpu["backend"] + ("" if gpu.get("offload") else " (no GPU offload)"))
    t.add_row("RPC backend", "yes (dspark rpc-server; --rpc HOST:PORT)" if gpu.get("rpc") else
              "no (reinstall with scripts/install.sh for dspark rpc-server and --rpc)")
    for dev in gpu.get("devices", []):
        mem = f", {fmt_bytes(dev['memory_free'])} free of {fmt_bytes(dev['memory_total'])}" if dev["memory_total"] else ""
        t.add_row("device", escape(f"{dev['name']} [{dev['type']}] {dev['description']}{mem}"))
    out.print("[bold]Machine[/]")
    out.print(t)

    models = report.get("models")
    if models:
        out.print("\n[bold]Models[/]")
        mt = Table(show_header=False, box=None, pad_edge=False)
        mt.add_column(style="bold")
        mt.add_column(overflow="fold")
        for role, e in models.items():
            if e.get("path"):
                extra = f" ({e['arch']}, {e['n_layer']} layers, vocab {e['n_vocab']})" if "arch" in e else ""
                mt.add_row(role, f"{e['path']}, {fmt_bytes(e['size'])}{extra}")
            else:
                mt.add_row(role, f"{escape(e['ref'])}: [red]{escape(e['problem'])}[/]")
        out.print(mt)
    mem = report.get("memory")
    if mem:
        out.print(f"\n[bold]Memory at {mem['n_ctx']} tokens of context[/]")
        mt = Table(show_header=True, box=None, pad_edge=False, header_style="bold")
        for col in ("", "weights", "KV cache", "buffers", "total"):
            mt.add_column(col, justify="right" if col else "left")
        for role in ("target", "draft"):
            x = mem.get(role)
            if x:
                total = x["weights"] + x["kv_cache"] + x["compute"]
                mt.add_row(role, fmt_bytes(x["weights"]), fmt_bytes(x["kv_cache"]), fmt_bytes(x["compute"]),
                           fmt_bytes(total))
        out.print(mt)
        verdict = "[green]fits[/]" if mem["fits_ram"] else "[red]does not fit[/]"
        out.print(f"RAM: needs {fmt_bytes(mem['ram_needed'])}, {fmt_bytes(mem['ram_available'])} available: {verdict}")
        if mem["vram_needed"]:
            free = fmt_bytes(mem["vram_free"]) if mem["vram_free"] is not None else "unknown"
            verdict = "[green]fits[/]" if mem["fits_vram"] else "[red]does not fit[/]"
            out.print(f"VRAM: needs {fmt_bytes(mem['vram_needed'])}, {free} free: {verdict}")
    pairing = report.get("pairing")
    if pairing:
        mark = {True: "[green]pairs[/]", False: "[red]does not pair[/]", None: "[yellow]unchecked[/]"}[pairing["ok"]]
        out.print(f"\n[bold]Pairing[/]: {mark}: {escape(pairing['detail'])}")
    _print_learned(out, report)
    if report["advice"]:
        out.print("\n[bold]Advice[/]")
        for line in report["advice"]:
            out.print(f"- {escape(line)}")


def _print_learned(out, report: dict) -> None:
    """What dspark measured and kept for these models: cost profiles and the derived draft's verdict."""
    from rich.markup import escape

    if report.get("models") and "target" in report["models"]:
        profiles = report.get("profiles") or []
        out.print(f"\n[bold]Cost profiles[/] ({len(profiles) or 'none yet: the first run learns its costs'})")
        for p in profiles:
            verify = ", ".join(f"{n}: {r:.1f}" for n, r in p["verify"].items())
            acc = ", ".join(f"{s} {a:.0%}" for s, a in p["acceptance"].items())
            step = f"{p['step_ms']:.1f} ms" if p["step_ms"] else "?"
            draft = f"; draft step {p['draft_step']:.2f}" if p["draft_step"] else ""
            out.print(escape(f"- {p['device']}, {p['threads']} threads, {p['runs']} runs: one-token step {step}; "
                             f"verify (x a step) {verify or '?'}{draft}; acceptance {acc or '?'}  [{p['path']}]"))
    exactness = report.get("exactness")
    if exactness:
        style = "green" if exactness["build"] == "exact" else "yellow"
        out.print(f"\n[bold]Exactness[/]: [{style}]{escape(exactness['detail'])}[/]")
        proofs = exactness.get("proofs") or []
        for p in proofs:
            cost = f", checked in {p['seconds']:.2f}s" if isinstance(p.get("seconds"), (int, float)) else ""
            out.print(escape(f"- {p['file']} on {p['device']}, {p['threads']} threads: {p['label']}{cost}"))
        if not proofs:
            target_given = report.get("models") and "target" in report["models"]
            out.print("- " + ("not proven yet on this build: the first load of this target with a drafter proves it"
                              if target_given else "no proof kept for this build yet (doctor -m MODEL shows a model's)"))
    verdict = report.get("derived_draft")
    if verdict is not None:
        choice = verdict.get("choice")
        line = (f"a {choice} copy is used (--draft-as-is for the file itself)" if choice else
                f"the file is used as it is ({verdict.get('why') or 'no re-encoded copy was faster here'})")
        figures = verdict.get("figures") or {}
        detail = "; ".join(f"{n}: step {f['step_ms']:.1f} ms, agreement {f['agreement']:.0%}" for n, f in figures.items())
        out.print(f"\n[bold]Draft layout[/]: {escape(line)}" + (f"\n  {escape(detail)}" if detail else ""))


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        target: o.Target = None,
        draft: o.Draft = None,
        pair: o.Pair = None,
        ctx_size: o.CtxSize = 4096,
        n_gpu_layers: o.GpuLayers = None,
        n_gpu_layers_draft: o.GpuLayersDraft = None,
        offline: o.Offline = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    ) -> None:
        """Check this machine and llama.cpp build; with models, whether they pair and fit in memory."""
        # The same checks as every command that loads models.
        ModelOptions(ctx_size=ctx_size, n_gpu_layers=n_gpu_layers, n_gpu_layers_draft=n_gpu_layers_draft).validate()
        if draft in ("none", "lookup"):
            draft = None
        report, problems = diagnose(target, draft, pair, n_ctx=ctx_size, n_gpu_layers=n_gpu_layers,
                                    n_gpu_layers_draft=n_gpu_layers_draft, offline=offline)
        report["problems"] = [p.message for p in problems]
        if as_json:
            write_json(report, indent=2, default=str)
        else:
            _print(report)
        if problems:
            raise problems[0]
