"""Where a batching server's time goes: one JSON line per scheduler event, when DSPARK_STEP_LOG names a file.

    DSPARK_STEP_LOG=/tmp/steps-{pid}.jsonl python3 scripts/bench_serve.py --real ...
    python3 scripts/step_log_report.py /tmp/steps-*.jsonl

The API opens it (api.py) and hands it to the batched scheduler (engine/batch.py, which does no I/O of its own).
`{pid}` in the name becomes the process id (bench_serve starts several servers). Events:
  step          jobs, streams, rows (per stream), sources (per job: draft, lookup, ... or null), tokens (added),
                draft_s, target_s (the passes), python_s (the rest of the step: planning, acceptance, delivery)
  prompt        tokens, seconds: one target prompt batch
  draft_prompt  tokens, seconds, streams: one draft-model prompt pass (what BatchPlanner.pays_back weighs)
Every line has "at", a monotonic clock in seconds, and "pid". Timing the scheduler's parts inside the server
processes is how the speculative server's draft prompts that were never repaid were found (README, "Serving many
clients"); A/B runs in one process did not show them.
"""

from __future__ import annotations

import json
import os
import time

from .console import say

STEP_LOG_VARIABLE = "DSPARK_STEP_LOG"


class StepLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # a line at a time: a killed server keeps its log

    @classmethod
    def from_environment(cls) -> "StepLog | None":
        """The log $DSPARK_STEP_LOG names, or None (unset, or a file that cannot be opened: one warning)."""
        name = os.environ.get(STEP_LOG_VARIABLE, "")
        if not name:
            return None
        path = name.replace("{pid}", str(os.getpid()))
        try:
            return cls(path)
        except OSError as e:
            say(f"warning: {STEP_LOG_VARIABLE}: cannot write {path} ({e.strerror or e}); no step log")
            return None

    def write(self, kind: str, **fields) -> None:
        line = {"kind": kind, "at": round(time.perf_counter(), 6), "pid": os.getpid()}
        line.update(fields)
        try:
            self._file.write(json.dumps(line) + "\n")
        except (OSError, ValueError):  # a full disk, a closed file: the log is a diagnostic, never a failure
            pass
