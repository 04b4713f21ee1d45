"""Shared fixtures: the real demo pair (fetched once into the user cache, as `dspark run` does) and a
tiny synthetic pair written with `gguf`. Models are loaded once per session; tests reset the caches
through the engine itself (it syncs to each prompt)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_pair  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "all_cores: a check at every core (the kernels' thread split): under pytest-xdist "
                                       "no other test runs beside it")
    # Cost profiles (what earlier runs measured) go to a folder of the test session's own, inherited by the CLI
    # and server processes the tests start: no test starts from what a user's runs, or another session, left.
    os.environ["DSPARK_PROFILES"] = tempfile.mkdtemp(prefix="dspark-profiles-")
    # The same for the exactness proof's verdicts: every session proves afresh, its pytest-xdist workers sharing
    # the controller's folder (a verdict is the build's, whoever proved it; each is written atomically).
    if "PYTEST_XDIST_WORKER" not in os.environ or "DSPARK_PROOFS" not in os.environ:
        os.environ["DSPARK_PROOFS"] = tempfile.mkdtemp(prefix="dspark-proofs-")
    # The dspark processes the tests start (a few hundred) keep their compiled bytecode in a folder of the
    # session's own, as an installed package has it: with PYTHONDONTWRITEBYTECODE (set on some machines) each
    # compiled dspark's modules afresh, 0.16 s a process.
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        os.environ.setdefault("PYTHONPYCACHEPREFIX", tempfile.mkdtemp(prefix="dspark-pycache-"))
    # Under pytest-xdist each worker gets its share of the cores (llama.cpp's threads spin at every barrier:
    # two workers of two threads each on two cores ran slower than one), in its models and the processes it starts.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        from dspark_cli.llama.backend import default_threads

        os.environ.setdefault("DSPARK_THREADS", str(max(1, default_threads() // workers)))


@pytest.fixture(autouse=True)
def _cores(request):
    """Under pytest-xdist, a test marked all_cores waits for the cores to itself (an exclusive lock; every other test
    holds a shared one): llama.cpp's threads spin at each barrier, and two threads beside another worker's busy
    process ran 3-15x slower than one."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    import fcntl

    exclusive = request.node.get_closest_marker("all_cores") is not None
    with open(Path(tempfile.gettempdir()) / f"dspark-tests-{run}.cores", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="session")
def demo_paths():
    from dspark_cli.models.demo import demo_pair

    return demo_pair()  # (target, draft)


@pytest.fixture(scope="session", autouse=True)
def demo_draft_layout_measured(demo_paths):
    """Whatever loads the demo pair measures its draft's layouts the first time on a build (models/derive.py,
    seconds, then cached) and proves its target exact (models/proofs.py): done once here, so no test's stderr or
    wait depends on being the first."""
    from dspark_cli.llama.model import Model
    from dspark_cli.models.derive import fastest_draft

    from dspark_cli.llama.kernels import EXACT_BATCH_MAX
    from dspark_cli.models.proofs import verdict_for

    target = Model(demo_paths[0], role="target", n_ctx=512)
    try:
        # ... and the exactness proof of its target, at the default threads, for the same reason.
        verdict_for(target, device="cpu", largest=EXACT_BATCH_MAX)
        return fastest_draft(demo_paths[1], target, threads=None, quiet=True)
    finally:
        target.close()


@pytest.fixture(scope="session")
def demo_models(demo_paths):
    from dspark_cli.llama.model import Model

    target = Model(demo_paths[0], role="target", n_ctx=2048)
    draft = Model(demo_paths[1], role="draft", n_ctx=2048)
    yield target, draft
    draft.close()
    target.close()


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tiny"), noise=0.1)


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    from dspark_cli.llama.model import Model

    target = Model(tiny_paths[0], role="target", n_ctx=512)
    draft = Model(tiny_paths[1], role="draft", n_ctx=512)
    yield target, draft
    draft.close()
    target.close()
