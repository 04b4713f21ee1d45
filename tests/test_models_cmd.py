"""`dspark models`: the registry as a table or JSON, with cached state and memory fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LoopbackHub, write_tiny_gguf  # noqa: E402


def dspark(*args, env):
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_json_lists_the_registry_pairs(tmp_path):
    with LoopbackHub() as hub:
        r = dspark("models", "--json", env=hub.env(tmp_path))
    assert r.returncode == 0, r.stderr
    pairs = json.loads(r.stdout)
    names = [p["name"] for p in pairs]
    assert len([p for p in pairs if not p["builtin"]]) >= 6 and "demo" in names
    for p in pairs:
        assert {"name", "target", "draft"} <= set(p)
        assert p["fits"]["needed"] > p["target_model"]["size"]
        assert p["fits"]["ram"] == (p["fits"]["needed"] <= p["fits"]["ram_available"])
    q = next(p for p in pairs if p["name"] == "qwen2.5-7b")
    assert q["target"] == "bartowski/Qwen2.5-7B-Instruct-GGUF:Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    assert q["cached"] is False and q["fits"]["estimate"] == "rough" and "qwen" in q["aliases"]
    # A 32B Q4 target is ~20 GB: the rough estimate adds KV cache and buffers on top of the weights.
    big = next(p for p in pairs if p["name"] == "qwen2.5-32b")
    assert big["fits"]["needed"] > 20_000_000_000
    assert abs(big["fits"]["ram_available"] - psutil.virtual_memory().available) < 2 << 30


def test_table_goes_to_stdout(tmp_path):
    with LoopbackHub() as hub:
        r = dspark("models", env=hub.env(tmp_path))
    assert r.returncode == 0, r.stderr
    for name in ("qwen2.5-7b", "qwen2.5-coder-32b", "llama3.1-8b", "gemma3-27b", "smollm2-1.7b", "demo"):
        assert name in r.stdout
    assert "fits RAM" in r.stdout


def test_pulled_pair_shows_as_cached_with_an_exact_estimate(tmp_path):
    t = write_tiny_gguf(tmp_path / "t.gguf", n_layer=4, weights=50_000)
    d = write_tiny_gguf(tmp_path / "d.gguf", n_layer=2, weights=5_000)
    with LoopbackHub() as hub:
        hub.add_file("org/t", "t.gguf", t.read_bytes())
        hub.add_file("org/d", "d.gguf", d.read_bytes())
        env = hub.env(tmp_path)
        cfg = Path(env["DSPARK_CONFIG_DIR"])
        cfg.mkdir(parents=True)
        (cfg / "models.toml").write_text(
            '[models.tt]\nrepo = "org/t"\nfile = "t.gguf"\nquant = "F32"\nsize = 200000\n'
            '[models.dd]\nrepo = "org/d"\nfile = "d.gguf"\nquant = "F32"\nsize = 20000\n'
            '[pairs.tiny]\ntarget = "tt"\ndraft = "dd"\ntemplate = "chatml"\ndraft_len = 2\nnote = "test pair only"\n'
        )
        before = next(p for p in json.loads(dspark("models", "--json", env=env).stdout) if p["name"] == "tiny")
        assert before["cached"] is False and before["source"] == "user"
        assert dspark("pull", "tiny", env=env).returncode == 0
        after = next(p for p in json.loads(dspark("models", "--json", env=env).stdout) if p["name"] == "tiny")
    assert after["cached"] is True and after["fits"]["estimate"] == "exact"
    assert after["target_model"]["size"] == t.stat().st_size  # the real size once downloaded
    assert after["fits"]["ram"] is True


def test_bad_ctx_size(tmp_path):
    with LoopbackHub() as hub:
        r = dspark("models", "--ctx-size", "1", env=hub.env(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("dspark: error: --ctx-size")
