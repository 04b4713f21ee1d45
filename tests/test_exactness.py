"""The proof at load (llama/proof.py): verify batches against one-token decoding, bit for bit, on dspark's build
(proven), on stock llama.cpp's libraries (not proven, with the sizes that differ), kept once per file and build,
and what `--exact` does with the verdict."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli.llama.kernels import EXACT_BATCH_MAX
from dspark_cli.llama.proof import Verdict, prove
from dspark_cli.models.proofs import stored_verdict, proof_key, verdict_for

DSPARK = [shutil.which("dspark")] if shutil.which("dspark") else [sys.executable, "-m", "dspark_cli"]
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Name three colours."


def test_the_proof_passes_on_the_demo_target_with_dspark_s_build(demo_models):
    target, _ = demo_models
    verdict = prove(target)
    assert verdict.proven and verdict.bound == verdict.checked == EXACT_BATCH_MAX and not verdict.differ
    assert verdict.label == f"proven (batches <= {EXACT_BATCH_MAX})"
    assert target.cached == []  # the cache is free again for the next generation


def test_the_proof_finds_where_batches_stop_matching(demo_models):
    """Past EXACT_BATCH_MAX a batch is a prompt, for llama.cpp's fast kernels: the proof must see those differ."""
    target, _ = demo_models
    verdict = prove(target, EXACT_BATCH_MAX + 4)
    assert not verdict.proven and verdict.bound == EXACT_BATCH_MAX
    assert sorted(verdict.differ) == list(range(EXACT_BATCH_MAX + 1, EXACT_BATCH_MAX + 5))
    assert all(gap > 0 for gap in verdict.differ.values())
    assert verdict.label.startswith(f"no - verify batches of {EXACT_BATCH_MAX + 1}-{EXACT_BATCH_MAX + 4} tokens "
                                    "differ from one-token decoding by up to ")
    assert verdict.label.endswith(f"; exact up to {EXACT_BATCH_MAX}")
    again = Verdict.from_dict(verdict.as_dict())  # what the cache keeps reads back the same
    assert (again.bound, again.checked, again.differ, again.label) == (verdict.bound, verdict.checked,
                                                                       verdict.differ, verdict.label)


REAL_TARGET = Path(os.environ.get("DSPARK_REAL_PAIR", "~/.cache/dspark/real-pair")).expanduser() / \
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


@pytest.mark.skipif(not REAL_TARGET.exists(), reason="the real pair is not fetched (scripts/fetch_real_pair.py)")
def test_the_proof_passes_on_the_real_target():
    from dspark_cli.llama.model import Model

    target = Model(REAL_TARGET, role="target", n_ctx=256)
    try:
        verdict = prove(target)
    finally:
        target.close()
    assert verdict.proven and verdict.bound == EXACT_BATCH_MAX, verdict.label


def test_a_proof_that_cannot_run_says_why_and_is_not_kept(tiny_models, tmp_path):
    target, _ = tiny_models
    verdict = prove(target, target.n_ctx)  # more than its context holds
    assert not verdict.proven and verdict.bound == 1 and verdict.reason
    assert verdict.label == f"no - not checked: the context holds {target.n_ctx} tokens, the proof needs {target.n_ctx + 4}"
    kept = verdict_for(target, device="cpu", largest=target.n_ctx, folder=tmp_path)
    assert kept.reason and not list(tmp_path.iterdir())  # the next load tries again


def test_the_verdict_is_kept_reused_and_proven_again_when_the_file_changes(tiny_paths, tmp_path):
    from dspark_cli.llama.model import Model

    path = tmp_path / "target.gguf"
    shutil.copyfile(tiny_paths[0], path)
    folder = tmp_path / "proofs"
    runs = []
    target = Model(path, role="target", n_ctx=256)
    try:
        first = verdict_for(target, device="cpu", largest=8, folder=folder, on_run=lambda: runs.append(1))
        second = verdict_for(target, device="cpu", largest=8, folder=folder, on_run=lambda: runs.append(2))
        assert runs == [1] and first.proven and not first.cached
        assert second.cached and second.label == first.label and second.bound == first.bound == 8
        assert verdict_for(target, device="cpu", largest=16, folder=folder, on_run=lambda: runs.append(3)).proven
        assert runs == [1, 3]  # another largest batch is another question
        # A verdict file that is not one is proven again and replaced.
        kept = next(p for p in folder.iterdir() if json.loads(p.read_text())["key"]["largest"] == 8)
        kept.write_text("{ not json")
        assert stored_verdict(proof_key(target, "cpu", 8), folder) is None
        verdict_for(target, device="cpu", largest=8, folder=folder, on_run=lambda: runs.append(4))
        assert runs == [1, 3, 4] and stored_verdict(proof_key(target, "cpu", 8), folder) is not None
        # The file changed in place (its modification time moves): proven again.
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        verdict_for(target, device="cpu", largest=8, folder=folder, on_run=lambda: runs.append(5))
        assert runs == [1, 3, 4, 5]
    finally:
        target.close()


def summary(stderr: str) -> str:
    """run's summary line (a note may follow it)."""
    return next(line for line in reversed(stderr.splitlines()) if " tok/s" in line)


def _run(*args, env=None, timeout=600):
    """dspark with args; `run` greedy, so that texts compare."""
    args = [*args[:1], "--temp", "0", *args[1:]] if args[:1] == ("run",) else list(args)
    return subprocess.run(DSPARK + args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})


def test_a_load_says_it_proved_once_then_reuses_the_verdict(demo_paths, tmp_path):
    env = {"DSPARK_PROOFS": str(tmp_path)}
    first = _run("run", PROMPT, "-n", "8", env=env)
    second = _run("run", PROMPT, "-n", "8", "--json", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "proving that verify batches match one-token decoding" in first.stderr
    assert "proving" not in second.stderr  # kept: the second load does not run it again
    assert "exact" not in summary(first.stderr)  # the summary says it only when it is not proven
    assert json.loads(second.stdout)["exact"] == f"proven (batches <= {EXACT_BATCH_MAX})"
    alone = _run("run", PROMPT, "-n", "8", "-d", "none", "--json", env=env)
    assert json.loads(alone.stdout)["exact"] == "yes (the target alone)" and "proving" not in alone.stderr


def test_the_api_says_it_and_exact_keeps_speculating_where_proven(demo_paths):
    import dspark_cli as dspark

    with dspark.load(exact=True, quiet=True) as pair:
        assert isinstance(pair.exactness, dspark.Verdict) and pair.exactness.proven
        # Drafting every step (no cost model, so whatever the machine's speed): proven, --exact takes nothing away.
        result = pair.complete(PROMPT, max_tokens=16, draft_max=4, fixed=True)
        assert result.stats.exact == pair.exact_label == f"proven (batches <= {EXACT_BATCH_MAX})"
        assert result.stats.n_drafted > 0
    with dspark.load(draft="none", quiet=True) as pair:
        assert pair.exactness is None and pair.complete(PROMPT, max_tokens=4).stats.exact == "yes (the target alone)"


@pytest.fixture(scope="module")
def stock_libs():
    """Stock llama.cpp's libraries, from the very llama.cpp our llama-cpp-python vendors, built without dspark's
    patches (minutes, once per machine; kept in dspark's cache)."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_speculative.sh"), "--libs"],
                           capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stderr[-3000:]
    return built.stdout.strip().splitlines()[-1]


def test_stock_llama_cpp_is_not_proven_and_exact_then_runs_the_target_alone(demo_paths, stock_libs, tmp_path):
    ours = {"DSPARK_PROOFS": str(tmp_path)}
    env = {"LLAMA_CPP_LIB_PATH": stock_libs, **ours}
    first = _run("run", PROMPT, "-n", "8", "--json", env=ours)  # dspark's build proves and keeps its verdict
    assert json.loads(first.stdout)["exact"] == f"proven (batches <= {EXACT_BATCH_MAX})"
    spec = _run("run", PROMPT, "-n", "24", "--json", env=env)
    assert spec.returncode == 0, spec.stderr
    assert "proving that verify batches match" in spec.stderr  # another build: its own proof, not ours reused
    warning = next(line for line in spec.stderr.splitlines() if "not proven exact" in line)
    assert "verify batches of 2-" in warning and "differ from one-token decoding by up to" in warning, warning
    assert json.loads(spec.stdout)["exact"].startswith("no - verify batches of 2-")
    assert summary(_run("run", PROMPT, "-n", "8", env=env).stderr).endswith("; not proven exact here")  # the summary says it

    exact = _run("run", PROMPT, "-n", "24", "--exact", "--json", env=env)
    alone = _run("run", PROMPT, "-n", "24", "-d", "none", "--json", env=env)
    assert exact.returncode == 0 and alone.returncode == 0, exact.stderr + alone.stderr
    assert "--exact: no verify batch is proven exact here" in exact.stderr and "running the target alone" in exact.stderr
    exact_record, alone_record = json.loads(exact.stdout), json.loads(alone.stdout)
    assert exact_record["text"] == alone_record["text"] and exact_record["text"].strip()
    assert exact_record["method"] == "target" and exact_record["drafted"] == 0

    # Several sequences in one pass are batches too: --exact cannot batch them here.
    parallel = _run("serve", "--exact", "--parallel", "2", "--port", "1", env=env)
    assert parallel.returncode == 2 and "--exact --parallel 2" in parallel.stderr
    assert "Traceback" not in parallel.stderr

    again = _run("run", PROMPT, "-n", "8", "--json", env=ours)  # dspark's build again: its verdict, kept
    assert "proving" not in again.stderr and json.loads(again.stdout)["exact"].startswith("proven")
    assert "measuring whether" not in again.stderr  # and the draft's layout verdict too (models/derive.py)

    doctor = _run("doctor", "--json", env=env)
    assert json.loads(doctor.stdout)["exactness"]["build"] == "unknown"  # libraries from elsewhere: not "fine"
    proofs = json.loads(_run("doctor", "-m", str(demo_paths[0]), "--json", env=env).stdout)["exactness"]["proofs"]
    assert proofs and not proofs[0]["proven"] and proofs[0]["differ"]
