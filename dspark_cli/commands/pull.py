"""`dspark pull PAIR|REF...`: download models into the Hugging Face cache; their paths go to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, write
from ..errors import UsageError


def expand(names: list[str]) -> list[str]:
    """Model references for the arguments: a pair name stands for its target and its draft."""
    from ..models.refs import resolve_pair
    from ..models.registry import load_registry

    reg = load_registry()
    refs: list[str] = []
    for name in names:
        if reg.is_pair(name):
            refs.extend(resolve_pair(name))
        else:
            refs.append(name)
    seen: set[str] = set()
    return [r for r in refs if not (r in seen or seen.add(r))]


def pull_refs(names: list[str], *, offline: bool = False) -> list[tuple[str, Path]]:
    from ..models.refs import resolve_model

    return [(ref, resolve_model(ref, pull=True, offline=offline)) for ref in expand(names)]


def register(app: typer.Typer) -> None:
    @app.command("pull")
    def pull(
        names: Annotated[list[str], typer.Argument(metavar="PAIR|REF...", help="Registry pairs or model references (org/repo:file.gguf, org/repo:QUANT, a registry model name).", show_default=False)],
        offline: Annotated[bool, typer.Option("--offline", help="Use the local cache only (like HF_HUB_OFFLINE=1).")] = False,
    ) -> None:
        """Download models into the Hugging Face cache (resumable, checksum-verified); print their paths."""
        if not names:
            raise UsageError("name at least one pair or model to pull")
        err = console(stderr=True)
        for ref, path in pull_refs(names, offline=offline):
            err.print(f"[green]✓[/] {ref}", highlight=False)
            write(f"{path}\n")
