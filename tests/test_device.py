"""The GPU check, tried here first so that minutes on a lent GPU machine produce figures, not typos:
scripts/device_check.py end to end on the CPU build (--tiny), and scripts/pack_for_device.sh's folder: under
64 MiB, its wheels resolving with no index for the device's Python 3.12, its trimmed source configuring with
CMake. The full offline compile (five minutes here) runs with DSPARK_TEST_OFFLINE_BUILD=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_tiny_runs_end_to_end(tmp_path):
    out = tmp_path / "device.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--tiny", "--reps", "2",
                        "--max-batch", "9", "--out", str(out), "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["note"].startswith("random weights")
    for name in ("target_q4_k_m", "target_q8_0", "draft_q8_0"):
        fig = result["figures"][name]
        assert fig["decode_ms"] > 0 and fig["prefill_512_tok_s"] > 0
        assert sorted(map(int, fig["verify_ms"])) == list(range(1, 10))
    assert result["identity"]["identical"] is True and result["identity"]["acceptance_rate"] == 1.0
    for target in ("target_q4_k_m", "target_q8_0"):
        assert set(result["cost_model_choice"][target]) == {"0.6", "0.8", "0.9"}
    assert result["backend"] and result["versions"]["llama_cpp_python"]
    assert not list(tmp_path.glob("*/*.gguf"))  # the models were written to a temporary folder, and removed


def make_pack(out: Path, python_version: str = "3.12") -> Path:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "pack_for_device.sh"), str(out)], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "DSPARK_PACK_PYTHON": python_version})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp("pack") / "device")


def test_the_pack_travels(pack):
    size = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    assert size < 64 << 20, size
    assert (pack / "llama-cpp-python" / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-cuda").is_dir()
    assert not (pack / "llama-cpp-python" / "vendor" / "llama.cpp" / "models").exists()
    series = (ROOT / "scripts" / "llama-cpp-patches" / "series").read_text().splitlines()
    patches = [line.removesuffix(".patch") for line in series if line and not line.startswith("#")]
    assert (pack / "applied-patches").read_text().split() == patches  # all of them, in the series' order


def test_the_pack_wheels_resolve_with_no_index_for_python_3_12(pack, tmp_path):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [r for r in project["dependencies"] if not r.startswith("llama-cpp-python")]
    reqs += ["gguf", "jinja2", "diskcache", "scikit-build-core", "setuptools", "wheel"]
    # The pack's own pip, run from its wheel: pip 23 (CI's) checks Requires-Python against the running Python
    # even with --python-version.
    (pip_wheel,) = (pack / "wheels").glob("pip-*.whl")
    r = subprocess.run([sys.executable, str(pip_wheel / "pip"), "install", "--dry-run", "--ignore-installed", "--no-index",
                        "--find-links", str(pack / "wheels"), "--python-version", "3.12", "--only-binary", ":all:",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                        "--target", str(tmp_path / "t"), *reqs], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Would install" in r.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_trimmed_source_configures(pack, tmp_path):
    r = subprocess.run(["cmake", "-S", str(pack / "llama-cpp-python"), "-B", str(tmp_path / "build"),
                        "-DGGML_NATIVE=OFF"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Including CPU backend" in r.stdout


@pytest.mark.skipif(os.environ.get("DSPARK_TEST_OFFLINE_BUILD") != "1", reason="five minutes of compiling")
def test_the_pack_builds_offline(tmp_path):
    """install.sh from a pack (for this Python) with no network at all (pip's index off), into a fresh venv."""
    pack = make_pack(tmp_path / "pack", f"{sys.version_info.major}.{sys.version_info.minor}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {**os.environ, "DSPARK_PACK": str(pack), "PYTHON": str(py), "PIP_NO_INDEX": "1",
           "DSPARK_WHEEL_CACHE": str(tmp_path / "wheels")}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    check = subprocess.run([str(py), "-c", "import dspark_cli, llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip()
