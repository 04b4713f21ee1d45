"""What the dspark command asks of its own process, and a library never does unasked (no llama.cpp import here,
so the CLI can ask before it knows whether a model will load).

After configure():
- a llama.cpp abort (an assertion, a lost RPC server) ends the process with one line on stderr and a
  documented exit code, after backend.abort_hook's hooks ran (chat keeps its transcript, serve ends its
  stream), instead of a core dump and, through gdb, a backtrace on stdout, the answer's channel
  (GGML_NO_BACKTRACE);
- a Ctrl-C while llama.cpp loads a model cancels the load instead of being dropped inside its progress
  callback (backend.deferred_interrupt swaps the SIGINT handler around the load, in the main thread).
"""

from __future__ import annotations

import os

configured = False


def configure() -> None:
    """Before the first model loads (cli.main calls it first thing)."""
    global configured
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    configured = True
