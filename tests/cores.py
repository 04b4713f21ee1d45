"""The machine's every thread, for the checks of the kernels' thread split (a bug there shows only with more
than one): under pytest-xdist a Model's default is one thread (DSPARK_THREADS, conftest.py), and these tests are
marked all_cores so that they run alone."""

from __future__ import annotations

import os
from contextlib import contextmanager

CORES = os.cpu_count() or 1


@contextmanager
def every_core(*models):
    """The session's shared models at CORES threads for one test, their own count back afterwards."""
    before = [m.n_threads for m in models]
    for m in models:
        m.set_threads(CORES)
    try:
        yield
    finally:
        for m, n in zip(models, before):
            m.set_threads(n)
