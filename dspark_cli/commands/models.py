"""`dspark models`: the registry's pairs, their sizes, whether they are downloaded and whether they fit here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..console import write_json
from ..errors import DsparkError
from ..loader import ModelOptions


def _model_entry(spec) -> dict:
    from ..models.refs import cached_path

    path = cached_path(spec.name)
    return {
        "name": spec.name,
        "ref": spec.ref,
        "repo": spec.repo,
        "file": spec.file,
        "quant": spec.quant,
        "size": path.stat().st_size if path else spec.size,  # the real size once it is here
        "sha256": spec.sha256,
        "builtin": spec.builtin,
        "cached": path is not None,
        "path": str(path) if path else None,
    }


def _fit(pair, t: dict, d: dict, n_ctx: int, ram_available: int, gpu: dict) -> dict:
    """Exact when both files are here (their GGUF headers are read), a rough guess from sizes otherwise."""
    from ..llama import memory
    from ..models.refs import resolve_model

    fit = {"ram_available": ram_available, "n_ctx": n_ctx}
    if t["cached"] and d["cached"]:
        try:
            p = memory.plan(resolve_model(pair.target.name), resolve_model(pair.draft.name), n_ctx=n_ctx,
                            ram_available=ram_available, gpu=gpu)
            need = p.ram_needed
            fit["estimate"] = "exact"
        except DsparkError:
            need = memory.rough_need(t["size"] + d["size"], n_ctx)
            fit["estimate"] = "rough"
    else:
        need = memory.rough_need(t["size"] + d["size"], n_ctx)
        fit["estimate"] = "rough"
    fit["needed"] = need
    fit["ram"] = need <= ram_available
    if gpu.get("vram_total"):
        fit["vram"] = need <= gpu["vram_total"]
        fit["vram_total"] = gpu["vram_total"]
    return fit


def list_pairs(n_ctx: int = 4096) -> list[dict]:
    import psutil

    from ..llama.machine import gpu_summary
    from ..models.registry import load_registry

    reg = load_registry()
    ram_available = psutil.virtual_memory().available
    gpu = gpu_summary()
    aliases: dict[str, list[str]] = {}
    for alias in reg.aliases:
        aliases.setdefault(reg.canonical(alias), []).append(alias)
    out = []
    for pair in reg.pairs.values():
        t, d = _model_entry(pair.target), _model_entry(pair.draft)
        out.append({
            "name": pair.name,
            "target": pair.target.ref,
            "draft": pair.draft.ref,
            "target_model": t,
            "draft_model": d,
            "template": pair.template,
            "draft_len": pair.draft_len,
            "note": pair.note,
            "builtin": pair.builtin,
            "unverified": pair.unverified,
            "aliases": sorted(aliases.get(pair.name, [])),
            "source": pair.source,
            "cached": t["cached"] and d["cached"],
            "fits": _fit(pair, t, d, n_ctx, ram_available, gpu),
        })
    return out


def _table(pairs: list[dict]) -> None:
    from rich.table import Table

    from ..console import console
    from ..llama.memory import fmt_bytes

    gpu_col = any("vram" in p["fits"] for p in pairs)
    table = Table(title=None, show_lines=False, header_style="bold")
    for col in ("pair", "target", "draft", "size", "cached", "fits RAM") + (("fits VRAM",) if gpu_col else ()):
        table.add_column(col, overflow="fold")
    yes, no = "[green]yes[/]", "[red]no[/]"
    for p in pairs:
        t, d, fit = p["target_model"], p["draft_model"], p["fits"]
        cached = "both" if p["cached"] else ("target" if t["cached"] else "draft" if d["cached"] else "no")
        approx = "~" if fit["estimate"] == "rough" else ""
        need = f" ({approx}{fmt_bytes(fit['needed'])})"
        row = [
            p["name"] + (f" ({', '.join(p['aliases'])})" if p["aliases"] else "")
            + (" [yellow](unverified)[/]" if p["unverified"] else ""),
            f"{t['name']} {t['quant']}",
            f"{d['name']} {d['quant']}",
            f"{fmt_bytes(t['size'])} + {fmt_bytes(d['size'])}",
            cached,
            (yes if fit["ram"] else no) + need,
        ]
        if gpu_col:
            row.append(yes if fit.get("vram") else no)
        table.add_row(*row)
    out = console(width=None if sys.stdout.isatty() else max(console().width, 140))
    out.print(table)


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of pairs instead of a table.")] = False,
        ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Context size the memory fit is judged at.")] = 4096,
    ) -> None:
        """List the registry's draft/target pairs: sizes, downloaded or not, and whether they fit this machine."""
        ModelOptions(ctx_size=ctx_size).validate()  # the same check as every command that loads models
        pairs = list_pairs(ctx_size)
        if as_json:
            write_json(pairs, indent=2)
        else:
            _table(pairs)
