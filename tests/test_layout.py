"""The package's layout holds: importing it loads no llama.cpp and changes nothing in the process, imports
point one way between the rooms (README "How the code is laid out"), no private name is imported across
modules, and the verify bound the engine keeps is the one the patched kernels were built with."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dspark_cli"

# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = [
    {"errors", "console", "files", "places", "net", "signals", "steplog"},
    {"llama"},
    {"engine"},
    {"models"},
    {"api", "loader", "prompt", "arguments"},
    {"chat", "views", "bench", "server"},
    {"commands"},
    {"cli", "__init__", "__main__"},  # the public surface, which names the API lazily
]


def _layer(room: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if room in names)


def _imports(path: Path):
    """(imported dspark_cli module, names) for every relative import in a file."""
    tree = ast.parse(path.read_text())
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                yield target, [a.name for a in node.names]
            else:
                for a in node.names:
                    sub = ROOT.joinpath(*target, a.name)
                    is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                    yield (target + [a.name], []) if is_module else (target, [a.name])


def _room(module: list[str]) -> str:
    return module[1] if len(module) > 1 else "__init__"


def test_importing_dspark_cli_loads_no_llama_cpp_and_changes_no_environment():
    code = ("import os, signal, sys\n"
            "env, handler = dict(os.environ), signal.getsignal(signal.SIGINT)\n"
            "import dspark_cli, dspark_cli.cli\n"  # the CLI starts (e.g. --help) without llama.cpp too
            "print('llama_cpp' in sys.modules, dict(os.environ) == env, signal.getsignal(signal.SIGINT) == handler)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True"]


def test_imports_point_one_way_and_no_private_names_cross_modules():
    wrong, private = [], []
    for path in PKG.rglob("*.py"):
        me = list(path.relative_to(ROOT).with_suffix("").parts)
        for target, names in _imports(path):
            if target[0] != "dspark_cli":
                continue
            if _layer(_room(target)) > _layer(_room(me)):
                wrong.append(f"{'/'.join(me)} imports {'.'.join(target)}")
            if target != me:
                private += [f"{'/'.join(me)} imports {'.'.join(target)}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not wrong, wrong
    assert not private, private


def test_the_verify_bound_is_the_patches_bound():
    from dspark_cli.llama.kernels import EXACT_BATCH_MAX

    defines = {}
    for patch in (ROOT / "scripts" / "llama-cpp-patches").glob("*.patch"):
        for name, value in re.findall(r"#define (DSPARK_(?:INVARIANT|ROWS)_BATCH) (\d+)", patch.read_text()):
            defines.setdefault(name, set()).add(int(value))
    assert set(defines) == {"DSPARK_INVARIANT_BATCH", "DSPARK_ROWS_BATCH"}
    assert all(values == {EXACT_BATCH_MAX} for values in defines.values()), defines
