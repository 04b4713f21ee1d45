"""`dspark doctor` on this machine, for real: memory, backend, versions, and a pair's fit and vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LoopbackHub, write_tiny_gguf  # noqa: E402

from dspark_cli.llama.machine import machine_info  # noqa: E402



@pytest.fixture
def env(tmp_path):
    with LoopbackHub() as hub:
        yield hub.env(tmp_path)


def dspark(*args, env):
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def test_machine_info_is_this_machine():
    info = machine_info()
    json.dumps(info)  # plain JSON-able values, for bench's header too
    assert info["ram"]["total"] == psutil.virtual_memory().total
    assert info["cpu"]["logical_cores"] == psutil.cpu_count()
    assert info["gpu"]["backend"] in ("none", "CUDA", "Metal", "Vulkan", "SYCL", "HIP", "MUSA", "CANN", "OpenCL")
    if Path("/proc/cpuinfo").exists() and " avx2 " in Path("/proc/cpuinfo").read_text():
        assert "avx2" in info["cpu"]["features"]
    if info["llama"]["llama_cpp_python"]:
        assert info["llama"]["ggml_version"] and info["llama"]["system_info"].startswith("CPU")
        assert any(d["type"] == "cpu" for d in info["gpu"]["devices"])


def test_patch_marker_written_by_install_sh(tmp_path):
    from dspark_cli.llama.kernels import dspark_patches

    assert dspark_patches(str(tmp_path)) is None  # not installed by scripts/install.sh: unknown
    (tmp_path / ".dspark-patches").write_text("")
    assert dspark_patches(str(tmp_path)) == []  # built stock (DSPARK_LLAMA_PATCHES=0)
    (tmp_path / ".dspark-patches").write_text("dspark-cpu-kernels\n")
    assert dspark_patches(str(tmp_path)) == ["dspark-cpu-kernels"]


def test_kernel_advice_names_what_a_build_lacks():
    from dspark_cli.commands.doctor import kernel_advice
    from dspark_cli.llama.kernels import KERNEL_PATCHES

    every = list(KERNEL_PATCHES)
    assert kernel_advice(every, "none", ["avx2"]) == []
    assert "without dspark's CPU kernels" in kernel_advice([], "none", ["avx2"])[0]
    older = kernel_advice(["dspark-cpu-kernels"], "none", ["avx2", "avx512f"])
    assert len(older) == 1 and "dspark-kquant-tiles" in older[0] and "dspark-cpu-kernels" not in older[0]
    assert kernel_advice([], "CUDA", ["avx2"]) == [] and kernel_advice(None, "none", ["avx2"]) == []


def test_the_kernel_list_matches_the_patches_shipped():
    from pathlib import Path

    from dspark_cli.llama.kernels import KERNEL_PATCHES

    folder = Path(__file__).parent.parent / "scripts" / "llama-cpp-patches"
    shipped = sorted(p.stem for p in folder.glob("*.patch"))
    assert sorted(KERNEL_PATCHES) == shipped
    # install.sh applies what the series file lists, in its order: every shipped patch, once
    series = [line for line in (folder / "series").read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(series) == [name + ".patch" for name in shipped]


def test_doctor_reports_memory_and_backend(env):
    r = dspark("doctor", env=env)
    assert r.returncode == 0, r.stderr
    info = machine_info()
    assert "RAM" in r.stdout and "GPU backend" in r.stdout and info["gpu"]["backend"] in r.stdout
    patches = info["llama"]["dspark_patches"]
    assert "dspark kernels" in r.stdout and (", ".join(patches) if patches else "stock" if patches == [] else "unknown") in r.stdout
    gib = f"{info['ram']['total'] / 2**30:.1f} GiB total"
    assert gib in r.stdout
    j = json.loads(dspark("doctor", "--json", env=env).stdout)
    assert j["machine"]["ram"]["total"] == psutil.virtual_memory().total
    assert j["machine"]["gpu"]["backend"] == info["gpu"]["backend"]
    if info["gpu"]["backend"] == "none":
        assert any("no GPU backend" in a for a in j["advice"])


def test_doctor_with_a_pair_that_matches(env, demo_paths):
    SMOL = demo_paths[1]
    r = dspark("doctor", "--target", str(SMOL), "--draft", str(SMOL), "--json", env=env)
    j = json.loads(r.stdout)
    assert j["memory"]["fits"] is True and j["memory"]["target"]["kv_cache"] == 90 * 2**20
    assert r.returncode == 0, r.stderr
    assert j["pairing"]["ok"] is True
    assert any("as big as the target" in a for a in j["advice"])  # same file twice: no gain possible


def test_doctor_stops_on_memory_with_the_preflight_message(env, tmp_path):
    t = write_tiny_gguf(tmp_path / "t.gguf", n_layer=64, n_embd=1024, n_head=8, n_head_kv=8, key_length=128)
    r = dspark("doctor", "--target", str(t), "--ctx-size", str(1 << 20), env=env)
    assert r.returncode == 7
    assert "does not fit" in r.stdout  # the report is still printed
    assert r.stderr.startswith("dspark: error: not enough memory:") and "--ctx-size" in r.stderr


def test_doctor_with_a_model_not_downloaded(env):
    r = dspark("doctor", "--pair", "qwen2.5-7b", env=env)
    assert r.returncode == 3
    assert "not downloaded yet" in r.stderr and "dspark pull" in r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_rejects_pair_with_target(env):
    r = dspark("doctor", "--pair", "demo", "--target", "x.gguf", env=env)
    assert r.returncode == 2 and r.stderr.startswith("dspark: error: --pair sets both models")


def test_doctor_shows_the_cost_profile_and_the_draft_layout(demo_paths, tmp_path):
    import os

    target, draft = (str(p) for p in demo_paths)
    e = {**os.environ, "DSPARK_PROFILES": str(tmp_path)}
    before = dspark("doctor", "-m", target, "-d", draft, "--json", env=e)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["profiles"] == []
    # 8 tokens: a fresh run's first two steps are plain ones (costs.Planner: the yardstick), so its profile holds
    # the one-token step whatever the rest of the answer does.
    r = dspark("run", "-m", target, "-d", draft, "-n", "8", "List three colours.", env=e)
    assert r.returncode == 0, r.stderr
    after = dspark("doctor", "-m", target, "-d", draft, "--json", env=e)
    report = json.loads(after.stdout)
    (profile,) = report["profiles"]
    assert profile["runs"] == 1 and profile["device"] == "cpu+cpu" and profile["step_ms"] > 0
    assert report["derived_draft"]["figures"]["as-is"]["step_ms"] > 0  # measured once per session (conftest)
    text = dspark("doctor", "-m", target, "-d", draft, env=e).stdout
    assert "Cost profiles (1)" in text and "Draft layout" in text
    # The build's exactness state (scripts/install.sh: every patch) and the proof kept for this target.
    exactness = report["exactness"]
    assert exactness["build"] == "exact" and exactness["proofs"] and exactness["proofs"][0]["proven"]
    assert "Exactness" in text and "proven (batches <= 16)" in text
