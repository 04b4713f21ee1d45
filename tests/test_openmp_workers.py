"""llama.cpp built with OpenMP (libgomp) keeps a team of worker threads for every thread that ran a decode, and once
the process holds more workers than cores every pass gets slower (backend.release_workers). So a load gives its
workers back before a server's scheduler thread generates, an idle scheduler gives back its own, and so does every
lone generation before the library's host calls again from another thread. Checked in a process of its own, by the
threads it holds: the workers are the threads Python did not start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dspark_cli.llama.backend import _libgomp_pause

CHILD = r"""
import json, os, sys, tempfile, threading, time
os.environ["DSPARK_PROOFS"] = tempfile.mkdtemp()  # the proof runs at load, on this thread
import numpy  # its BLAS starts threads of its own on import: before the count
import dspark_cli as dspark

def workers():
    python = {t.native_id for t in threading.enumerate()}
    return sum(1 for task in os.listdir("/proc/self/task") if int(task) not in python)

def settled(expected):
    # A team given back ends its threads as they wake: wait for the state (a wrong count waits out the deadline).
    deadline = time.monotonic() + 60
    while workers() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers()

target, draft = sys.argv[1:3]
base = workers()
seen = {}
with dspark.load(target=target, draft=draft, threads=2, parallel=2, quiet=True) as pair:
    seen["batched: loaded"] = settled(base)
    pair.complete("one two three", max_tokens=8)
    seen["batched: idle"] = settled(base)  # the scheduler thread, idle, gave back its one worker
seen["batched: closed"] = settled(base)

with dspark.load(target=target, draft=draft, threads=2, quiet=True) as pair:
    seen["lone: loaded"] = settled(base)
    hold = threading.Event()
    for name in ("first", "second"):  # two host threads that live on, as a web server's do
        done = threading.Event()
        def call():
            pair.complete("one two three", max_tokens=8)
            done.set()
            hold.wait()
        threading.Thread(target=call, daemon=True).start()
        done.wait()
        seen[f"lone: {name} thread answered"] = settled(base)
    hold.set()
print(json.dumps({"base": base, "seen": seen}))
"""


@pytest.mark.skipif(_libgomp_pause() is None, reason="llama.cpp here is not built with libgomp")
def test_a_thread_gives_its_workers_back_when_its_decodes_end(tiny_paths):
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_paths[0]), str(tiny_paths[1])],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    base = got["base"]
    assert got["seen"] == {"batched: loaded": base, "batched: idle": base, "batched: closed": base,
                           "lone: loaded": base, "lone: first thread answered": base,
                           "lone: second thread answered": base}
