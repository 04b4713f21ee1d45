"""scripts/bench_serve.py's arguments: a bad one ends in one line and exit 2 before any server starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_serve.py"


@pytest.mark.parametrize("args, says", [
    (["--clients", "x"], "--clients: client counts"),
    (["--clients", "0,2"], "must be at least 1"),
    (["--rounds", "0"], "must be at least 1"),
    (["-n", "0"], "must be at least 1"),
    (["--system", "-1"], "--system at least 0"),
    (["--servers", "nonsense"], "--servers: choose from"),
])
def test_a_bad_argument_is_one_line_and_no_server(args, says):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "exited" not in r.stderr  # no server was started
