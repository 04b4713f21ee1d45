"""DSPARK_THREADS: the default of --threads for the command and of load(threads=) for the library (the tests
themselves run under it, one share of the cores per pytest-xdist worker), --threads still winning, and a value
that is not a number of threads refused in one line before anything loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dspark_cli as dspark
from dspark_cli.errors import UsageError

DSPARK = [sys.executable, "-m", "dspark_cli"]


def dspark_with(value: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "DSPARK_THREADS": value}
    return subprocess.run(DSPARK + list(args), capture_output=True, text=True, env=env, timeout=300)


def test_the_library_takes_its_threads_from_the_variable_unless_told(tiny_paths, monkeypatch):
    monkeypatch.setenv("DSPARK_THREADS", "3")
    with dspark.load(target=str(tiny_paths[0]), draft=str(tiny_paths[1]), quiet=True) as pair:
        assert pair.target.n_threads == 3
    with dspark.load(target=str(tiny_paths[0]), draft="none", threads=1, quiet=True) as pair:
        assert pair.target.n_threads == 1


@pytest.mark.parametrize("value", ["0", "2.5", "100000"])
def test_a_bad_value_is_one_line_and_exit_2_before_loading(tiny_paths, value, monkeypatch):
    r = dspark_with(value, "run", "-m", str(tiny_paths[0]), "-d", "none", "-n", "2", "--raw", "the")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("dspark: error:")]
    assert "DSPARK_THREADS" in line and repr(value) in line
    monkeypatch.setenv("DSPARK_THREADS", value)  # the library: the same words, as a DsparkError
    with pytest.raises(UsageError, match="DSPARK_THREADS"):
        dspark.load(target=str(tiny_paths[0]), draft="none", quiet=True)


def test_more_than_the_machine_warns_and_names_the_variable(tiny_paths):
    too_many = str((os.cpu_count() or 1) * 50)
    r = dspark_with(too_many, "run", "-m", str(tiny_paths[0]), "-d", "none", "-n", "2", "--raw", "the")
    assert r.returncode == 0, r.stderr
    assert f"DSPARK_THREADS={too_many} is more than this machine's" in r.stderr
    # --threads wins over the variable: no warning then
    r = dspark_with(too_many, "run", "-m", str(tiny_paths[0]), "-d", "none", "-n", "2", "--raw", "-t", "1", "the")
    assert r.returncode == 0 and "hardware threads" not in r.stderr, r.stderr
