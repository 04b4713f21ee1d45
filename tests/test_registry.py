"""models.toml: every entry complete and consistent; the user file; model references."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dspark_cli.errors import ModelFileError, UsageError
from dspark_cli.models.refs import ModelRef, parse_ref, resolve_model, resolve_pair
from dspark_cli.models.registry import load_registry, packaged_registry_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    d = tmp_path / "config"
    d.mkdir()
    monkeypatch.setenv("DSPARK_CONFIG_DIR", str(d))
    return d


def test_packaged_file_is_the_top_level_one_and_a_built_wheel_carries_it(tmp_path):
    """One real file in the tree (no symlink: they break on some systems and in some sdists); setup.py copies
    it into the wheel, where an installed dspark finds it."""
    import subprocess
    import sys
    import zipfile

    assert packaged_registry_path() == ROOT / "models.toml"
    assert not (ROOT / "dspark_cli" / "data").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("dspark-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("dspark_cli/data/models.toml") == (ROOT / "models.toml").read_bytes()


def test_every_entry_is_complete(config_dir):
    raw = tomllib.loads((ROOT / "models.toml").read_text())
    for name, m in raw["models"].items():
        keys = {"quant", "size"} if m.get("builtin") else {"repo", "file", "quant", "size"}
        assert keys <= set(m), f"models.{name} lacks {keys - set(m)}"
        assert isinstance(m["size"], int) and m["size"] > 1_000_000, name
        if not m.get("builtin"):
            assert m["file"].endswith(".gguf") and m["repo"].count("/") == 1, name
            assert m["quant"].lower() in m["file"].lower(), f"{name}: quant not in the file name"
    for name, p in raw["pairs"].items():
        assert {"target", "draft", "template", "draft_len", "note"} <= set(p), name
        assert p["target"] in raw["models"] and p["draft"] in raw["models"], name
        assert len(p["note"]) > 20, name
    reg = load_registry()
    assert set(reg.pairs) == set(raw["pairs"])


def test_names_are_unique_across_pairs_models_and_aliases():
    raw = tomllib.loads((ROOT / "models.toml").read_text())
    names = list(raw["models"]) + list(raw["pairs"]) + list(raw["aliases"])
    assert len(names) == len(set(names))


def test_registry_covers_the_families_the_issue_names(config_dir):
    reg = load_registry()
    real = [p for p in reg.pairs.values() if not p.builtin]
    assert len(real) >= 6
    assert reg.pairs["demo"].builtin
    repos = {(p.target.repo, p.draft.repo) for p in real}
    for size in ("7B", "14B", "32B"):
        assert (f"bartowski/Qwen2.5-{size}-Instruct-GGUF", "bartowski/Qwen2.5-0.5B-Instruct-GGUF") in repos
        assert (f"bartowski/Qwen2.5-Coder-{size}-Instruct-GGUF", "bartowski/Qwen2.5-Coder-0.5B-Instruct-GGUF") in repos
    assert any("Llama-3.1-8B" in t and "Llama-3.2-1B" in d for t, d in repos)
    assert any("gemma-3-12b" in t for t, d in repos) and any("gemma-3-27b" in t for t, d in repos)
    assert any("SmolLM2-1.7B" in t and ("135M" in d or "360M" in d) for t, d in repos)
    for p in real:
        assert p.draft.size < p.target.size / 3, f"{p.name}: draft too big to pay off"
        # Pairs are within one family: same tokenizer, which the vocabulary rule needs.
        fam = lambda repo: repo.split("/")[1].split("-")[0].lower().replace("meta", "llama")
        assert fam(p.target.repo)[:5] == fam(p.draft.repo)[:5], p.name


def test_user_file_adds_pairs_and_aliases(config_dir):
    (config_dir / "models.toml").write_text(
        '[models.my-target]\nrepo = "me/t-GGUF"\nfile = "t-Q8_0.gguf"\nquant = "Q8_0"\nsize = 2000000\n'
        '[pairs.mine]\ntarget = "my-target"\ndraft = "qwen2.5-0.5b-instruct"\ntemplate = "chatml"\n'
        'draft_len = 3\nnote = "my own pair, not verified"\n[aliases]\nm = "mine"\n'
    )
    reg = load_registry()
    assert reg.pair("m").name == "mine" and reg.pair("mine").source == "user"
    assert resolve_pair("m") == ("my-target", "qwen2.5-0.5b-instruct")
    assert "qwen2.5-7b" in reg.pairs  # the packaged ones are still there


def test_bad_user_file_is_a_one_line_error(config_dir):
    (config_dir / "models.toml").write_text('[pairs.x]\ntarget = "nope"\n')
    env = dict(os.environ, DSPARK_CONFIG_DIR=str(config_dir))
    r = subprocess.run([sys.executable, "-m", "dspark_cli", "models"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("dspark: error: ") and "pairs.x lacks" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_pair_lists_the_known_ones(config_dir):
    with pytest.raises(UsageError) as e:
        resolve_pair("no-such-pair")
    assert "qwen2.5-7b" in e.value.hint


def test_reference_forms(tmp_path, config_dir):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16)
    assert parse_ref(str(f)) == ModelRef(str(f), "path", path=f)
    r = parse_ref("org/repo:sub/m.gguf")
    assert (r.kind, r.repo, r.file) == ("hub", "org/repo", "sub/m.gguf")
    r = parse_ref("org/repo:q4_k_m")
    assert (r.kind, r.repo, r.file, r.quant) == ("hub", "org/repo", None, "q4_k_m")
    # A quant the registry knows for that repo resolves to its file without asking the hub.
    r = parse_ref("bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M")
    assert r.file == "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    with pytest.raises(UsageError):  # an alias of a pair names a pair, not a model
        parse_ref("qwen")
    r = parse_ref("qwen2.5-0.5b-instruct")
    assert (r.kind, r.repo, r.file) == ("registry", "bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Qwen2.5-0.5B-Instruct-Q8_0.gguf")
    assert parse_ref("demo-draft").kind == "builtin"


@pytest.mark.parametrize("ref,error,text", [
    ("qwen2.5-7b", UsageError, "is a pair"),
    ("org/repo", UsageError, "org/repo:FILE.gguf"),
    ("./missing.gguf", ModelFileError, "no such model file"),
    ("nonsense", UsageError, "unknown model"),
    ("", UsageError, "empty"),
    ("org/repo:weird.bin", UsageError, "after the colon"),
])
def test_bad_references(ref, error, text, config_dir):
    with pytest.raises(error) as e:
        parse_ref(ref)
    assert text in e.value.message


def test_not_downloaded_says_how_to_get_it(config_dir):
    with pytest.raises(ModelFileError) as e:
        resolve_model("dspark-test-org/never-cached:x.gguf")
    assert "not downloaded yet" in e.value.message
    assert "dspark pull dspark-test-org/never-cached:x.gguf" in e.value.hint and "--pull" in e.value.hint


def test_not_a_gguf_file(tmp_path, config_dir):
    f = tmp_path / "x.gguf"
    f.write_text("hello")
    with pytest.raises(ModelFileError):
        resolve_model(str(f))
