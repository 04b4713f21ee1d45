"""The GPU check, tried here first so that minutes on a lent GPU machine produce figures, not typos:
scripts/device_check.py end to end on the CPU build (--tiny), and scripts/pack_for_device.sh's folder: under
64 MiB, its wheels resolving with no index for the device's Python 3.12, its trimmed source configuring with
CMake. The full offline compile (five minutes here) runs with DSPARK_TEST_OFFLINE_BUILD=1. And the patching
both share (install.sh --apply-patches): every patch applies to the sdist's llama.cpp exactly, and one that
does not stops the install with a line naming it and the opt-out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "scripts" / "llama-cpp-patches"
INSTALL = ROOT / "scripts" / "install.sh"
# the llama-cpp-python install.sh builds (its default, unless LLAMA_CPP_PYTHON_VERSION says otherwise)
VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION") or re.search(
    r'LLAMA_CPP_PYTHON_VERSION="\$\{LLAMA_CPP_PYTHON_VERSION:-([^}]+)\}"', INSTALL.read_text()).group(1)


def series() -> list[str]:
    lines = (PATCHES / "series").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def patched_files() -> set[str]:
    return {m.group(1) for name in series()
            for m in re.finditer(r"^\+\+\+ b/(\S+)", (PATCHES / name).read_text(), re.M)}


@pytest.fixture(scope="module")
def vendored(tmp_path_factory) -> Path:
    """The files dspark's patches touch, as llama-cpp-python's sdist vendors them (its llama.cpp, in the same
    folders): pip download, which reads pip's cache after the first time; only those files are unpacked."""
    folder = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                    str(folder), f"llama-cpp-python=={VERSION}"], check=True, capture_output=True, timeout=900)
    (sdist,) = folder.glob("llama_cpp_python-*.tar.gz")
    wanted = patched_files()
    tree = folder / "llama.cpp"
    with tarfile.open(sdist) as tar:
        for member in tar:
            parts = member.name.split("/", 3)  # llama_cpp_python-V / vendor / llama.cpp / path
            if member.isfile() and len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3] in wanted:
                target = tree / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()} == wanted
    return tree


def apply_patches(tree: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), "--apply-patches", str(tree)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs patch")
def test_every_patch_applies_exactly_to_the_vendored_llama_cpp(vendored, tmp_path):
    tree = shutil.copytree(vendored, tmp_path / "llama.cpp")
    r = apply_patches(tree)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name.removesuffix(".patch") for name in series()]  # all of them, in order
    assert "error" not in r.stderr and not list(tree.rglob("*.orig")) and not list(tree.rglob("*.rej"))
    assert "dspark" in (tree / "ggml" / "src" / "ggml-cpu" / "ggml-cpu.c").read_text()
    stock = apply_patches(shutil.copytree(vendored, tmp_path / "stock"), DSPARK_LLAMA_PATCHES="0")
    assert stock.returncode == 0 and stock.stdout == ""  # the opt-out: nothing applied


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs patch")
def test_a_patch_that_does_not_apply_exactly_stops_the_install(vendored, tmp_path):
    """One line of llama.cpp changed where the first patch's first hunk begins: plain `patch` would apply that
    hunk with fuzz (it did, and install.sh went on); install.sh must refuse, name the patch and the opt-out."""
    tree = shutil.copytree(vendored, tmp_path / "llama.cpp")
    first = series()[0]
    text = (PATCHES / first).read_text()
    hunk = re.search(r"^\+\+\+ b/(\S+)\n@@ -(\d+)(?:,\d+)? \+\S+ @@[^\n]*\n( [^\n]*)\n", text, re.M)
    assert hunk, first
    path, line, context = tree / hunk.group(1), int(hunk.group(2)), hunk.group(3)[1:]
    lines = path.read_text().split("\n")
    assert lines[line - 1] == context
    lines[line - 1] = context + " /* changed by a test */"
    path.write_text("\n".join(lines))
    fuzzy = subprocess.run(["patch", "-p1", "--dry-run", "-d", str(tree)], stdin=(PATCHES / first).open(),
                           capture_output=True, text=True)
    assert fuzzy.returncode == 0 and "fuzz" in fuzzy.stdout  # what the old install.sh accepted

    r = apply_patches(tree)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and first in errors[0] and "does not apply" in errors[0], r.stderr
    assert "DSPARK_LLAMA_PATCHES=0" in r.stderr and "near-ties" in r.stderr
    assert "Hunk #1 FAILED" in r.stderr  # patch's own words on where
    assert r.stdout == ""  # nothing reported as applied
    assert "changed by a test" in path.read_text() and "dspark" not in path.read_text()  # left as it was


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
        # The exactness proof per verify size, on dspark's CPU build: every size matches.
        exact = result["figures"][target]["exact"]
        assert exact["proven"] and exact["bound"] == 9 and exact["by_size"] == {str(n): True for n in range(2, 10)}
        assert result["exact"][target] == "proven (batches <= 9)"
    assert result["identity_exact"]["verify_max"] == 9 and result["identity_exact"]["identical"] is True
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
