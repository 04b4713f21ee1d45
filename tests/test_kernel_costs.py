"""scripts/kernel_costs.py --decode-only on a demo pair's file (its draft: the script times any GGUF file, and the
draft's decode steps take a third of the target's): real processes over real llama.cpp builds, each rep a fresh
process per build, and the per-rep speed ratios it reports follow from the times it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kernel_costs.py"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def installed_lib_dir() -> str:
    import llama_cpp

    return str(Path(llama_cpp.__file__).parent / "lib")


def test_decode_only_reports_each_build_and_the_per_rep_ratio(demo_paths):
    model = str(demo_paths[1])
    # "stock" here is the installed build loaded through --stock-lib: the comparison path, not a speed claim.
    # Two reps: one in each order (the builds alternate), and a spread between the fastest and the slowest.
    r = run("--decode-only", "--reps", "2", "--stock-lib", installed_lib_dir(), "--json", model)
    assert r.returncode == 0, r.stderr
    per = json.loads(r.stdout)[model]
    assert set(per) == {"dspark", "stock"}
    for b in per.values():
        assert 0 < b["min_ms"] <= b["decode_ms"] <= b["max_ms"]
    d = per["dspark"]
    assert 0 < d["speed_min"] <= d["speed_median"] <= d["speed_max"]
    # the slowest rep of one build against the fastest of the other bounds every per-rep ratio
    assert d["speed_max"] <= per["stock"]["max_ms"] / d["min_ms"] + 1e-9
    assert d["speed_min"] >= per["stock"]["min_ms"] / d["max_ms"] - 1e-9


def test_decode_only_text_report_without_stock(demo_paths):
    r = run("--decode-only", "--reps", "1", "--no-stock", str(demo_paths[1]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == Path(demo_paths[1]).name
    assert lines[1].startswith("dspark  decode ms: median ") and "vs stock" not in r.stdout
    assert len(lines) == 2
