"""`dspark pull` through the real huggingface-hub client against the loopback hub (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LoopbackHub, hub_env  # noqa: E402


@pytest.fixture
def hub(tmp_path):
    with LoopbackHub() as h:
        yield h


def dspark(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def error_lines(r):
    return [line for line in r.stderr.splitlines() if line.startswith("dspark: error:")]


def in_cache(home: Path, repo: str, file: str) -> list[Path]:
    root = home / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return list(root.glob(f"*/{file}")) if root.exists() else []


def test_full_download_lands_in_the_hf_cache(hub, tmp_path):
    data = os.urandom(300_000)
    hub.add_file("org/repo", "m-Q8_0.gguf", data)
    env = hub.env(tmp_path)
    r = dspark("pull", "org/repo:m-Q8_0.gguf", env=env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.read_bytes() == data
    assert path in in_cache(tmp_path, "org/repo", "m-Q8_0.gguf")
    assert os.path.realpath(path).endswith(hashlib.sha256(data).hexdigest())  # one blob, no second copy
    gets = sum(1 for m, p, h in hub.requests if m == "GET")
    r2 = dspark("pull", "org/repo:m-Q8_0.gguf", env=env)
    assert r2.returncode == 0 and Path(r2.stdout.strip()) == path
    assert sum(1 for m, p, h in hub.requests if m == "GET") == gets  # cached: nothing fetched again


def test_resumes_after_the_server_drops_the_connection(hub, tmp_path):
    # huggingface-hub writes in 10 MiB chunks, so the cut must come after the first chunk to leave bytes to keep.
    data = os.urandom(24_000_000)
    hub.add_file("org/repo", "big.gguf", data, drop_after=12_000_000)
    r = dspark("pull", "org/repo:big.gguf", env=hub.env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == data
    ranges = hub.gets_with_range()
    assert len(ranges) == 1 and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"
    assert int(ranges[0][6:-1]) >= 10 * 1024 * 1024
    assert "resuming" in r.stderr


def test_missing_file_is_one_line_error(hub, tmp_path):
    hub.add_file("org/repo", "there.gguf", b"x" * 10)
    r = dspark("pull", "org/repo:missing.gguf", env=hub.env(tmp_path))
    assert r.returncode == 6
    assert r.stdout == ""
    assert error_lines(r) == [f"dspark: error: missing.gguf not found in org/repo on {hub.url}"]
    assert "Traceback" not in r.stderr


def test_checksum_mismatch_is_caught_and_the_file_removed(hub, tmp_path):
    hub.add_file("org/repo", "bad.gguf", os.urandom(50_000), etag="ab" * 32)
    r = dspark("pull", "org/repo:bad.gguf", env=hub.env(tmp_path))
    assert r.returncode == 6
    assert "checksum mismatch for org/repo:bad.gguf" in error_lines(r)[0]
    assert in_cache(tmp_path, "org/repo", "bad.gguf") == []


def test_registry_sha256_is_checked(hub, tmp_path):
    data = os.urandom(40_000)
    hub.add_file("org/repo", "r-Q4_0.gguf", data)
    env = hub.env(tmp_path)
    cfg = Path(env["DSPARK_CONFIG_DIR"])
    cfg.mkdir(parents=True)
    (cfg / "models.toml").write_text(
        f'[models.mine]\nrepo = "org/repo"\nfile = "r-Q4_0.gguf"\nquant = "Q4_0"\nsize = 40000\nsha256 = "{"0" * 64}"\n'
    )
    r = dspark("pull", "mine", env=env)
    assert r.returncode == 6 and "checksum mismatch" in r.stderr
    (cfg / "models.toml").write_text(
        f'[models.mine]\nrepo = "org/repo"\nfile = "r-Q4_0.gguf"\nquant = "Q4_0"\nsize = 40000\n'
        f'sha256 = "{hashlib.sha256(data).hexdigest()}"\n'
    )
    r = dspark("pull", "mine", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == data


def test_offline_uses_the_cache_only(hub, tmp_path):
    data = os.urandom(20_000)
    hub.add_file("org/repo", "o.gguf", data)
    env = hub.env(tmp_path)
    assert dspark("pull", "org/repo:o.gguf", env=env).returncode == 0
    hub.stop()
    n = len(hub.requests)
    for extra_env, flag in (({}, ["--offline"]), ({"HF_HUB_OFFLINE": "1"}, [])):
        r = dspark("pull", *flag, "org/repo:o.gguf", env={**env, **extra_env})
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).read_bytes() == data
        r = dspark("pull", *flag, "org/repo:other.gguf", env={**env, **extra_env})
        assert r.returncode == 6
        assert "not in the Hugging Face cache" in error_lines(r)[0] and "offline" in error_lines(r)[0]
    assert len(hub.requests) == n


def test_quantization_picks_the_file_from_the_repo_listing(hub, tmp_path):
    hub.add_file("org/multi", "model-Q4_K_M.gguf", b"q4" * 1000)
    hub.add_file("org/multi", "model-Q8_0.gguf", b"q8" * 1000)
    hub.add_file("org/multi", "mmproj-model-Q8_0.gguf", b"mm" * 1000)
    env = hub.env(tmp_path)
    r = dspark("pull", "org/multi:q8_0", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).name == "model-Q8_0.gguf"
    r = dspark("pull", "org/multi:Q2_K", env=env)
    assert r.returncode == 6 and "no Q2_K GGUF file in org/multi" in r.stderr


def test_a_pair_pulls_both_models(hub, tmp_path):
    hub.add_file("org/t", "t.gguf", b"t" * 5000)
    hub.add_file("org/d", "d.gguf", b"d" * 500)
    env = hub.env(tmp_path)
    cfg = Path(env["DSPARK_CONFIG_DIR"])
    cfg.mkdir(parents=True)
    (cfg / "models.toml").write_text(
        '[models.tt]\nrepo = "org/t"\nfile = "t.gguf"\nquant = "F16"\nsize = 5000\n'
        '[models.dd]\nrepo = "org/d"\nfile = "d.gguf"\nquant = "F16"\nsize = 500\n'
        '[pairs.tiny]\ntarget = "tt"\ndraft = "dd"\ntemplate = "chatml"\ndraft_len = 2\nnote = "test pair only"\n'
    )
    r = dspark("pull", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["t.gguf", "d.gguf"]


def test_gated_repo_needs_the_token(hub, tmp_path):
    hub.add_repo("org/gated", gated_token="hf_test_token")
    hub.add_file("org/gated", "g.gguf", b"g" * 100)
    env = hub.env(tmp_path)
    r = dspark("pull", "org/gated:g.gguf", env=env)
    assert r.returncode == 6 and "org/gated is a gated repo" in error_lines(r)[0]
    r = dspark("pull", "org/gated:g.gguf", env={**env, "HF_TOKEN": "hf_test_token"})
    assert r.returncode == 0, r.stderr
    # The token file `hf auth login` writes is read too (a fresh cache so it downloads again).
    env2 = hub.env(tmp_path / "second")
    Path(env2["HF_HOME"]).mkdir(parents=True)
    (Path(env2["HF_HOME"]) / "token").write_text("hf_test_token")
    r = dspark("pull", "org/gated:g.gguf", env=env2)
    assert r.returncode == 0, r.stderr


def test_unknown_repo(hub, tmp_path):
    r = dspark("pull", "org/nope:x.gguf", env=hub.env(tmp_path))
    assert r.returncode == 6 and "repository org/nope not found" in error_lines(r)[0]


def test_no_network_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = hub_env(f"http://127.0.0.1:{port}", tmp_path)
    r = dspark("pull", "org/repo:x.gguf", env=env)
    assert r.returncode == 6
    assert error_lines(r)[0].startswith(f"dspark: error: cannot reach http://127.0.0.1:{port} (no network?)")


def test_a_quant_of_a_repo_the_server_lacks_names_both(tmp_path):
    # A server that is not a hub at all (a mirror without the repo): every route is a plain 404.
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = dspark("pull", "bartowski/foo:Q4_K_M", env=hub_env(f"http://127.0.0.1:{server.server_port}", tmp_path))
    finally:
        server.shutdown()
    assert r.returncode == 6 and len(error_lines(r)) == 1, r.stderr
    assert "Q4_K_M" in error_lines(r)[0] and "bartowski/foo" in error_lines(r)[0] and "None" not in r.stderr


def test_no_network_for_a_listing_fails_fast_and_quietly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = dspark("pull", "org/repo:Q4_K_M", env=hub_env(f"http://127.0.0.1:{port}", tmp_path), timeout=15)
    assert r.returncode == 6
    assert r.stderr.startswith("dspark: error: cannot look for the Q4_K_M file of org/repo: cannot reach"), r.stderr
    assert "Retry" not in r.stderr and len(r.stderr.splitlines()) == 2  # the error and its hint


def test_full_disk_is_caught_before_downloading(hub, tmp_path):
    hub.add_file("org/repo", "huge.gguf", b"x" * 100, announce_size=10**17)
    r = dspark("pull", "org/repo:huge.gguf", env=hub.env(tmp_path))
    assert r.returncode == 6
    assert "not enough disk space for org/repo:huge.gguf" in error_lines(r)[0]
    assert not any(m == "GET" for m, p, h in hub.requests)


def test_disk_full_during_download_maps_to_download_error():
    # ENOSPC mid-write cannot be staged on this machine's disk; the mapping is checked on the real errno.
    import errno

    from dspark_cli.errors import DownloadError
    from dspark_cli.models.hub import _download_error

    e = _download_error(OSError(errno.ENOSPC, "No space left on device"), "org/repo", "m.gguf")
    assert isinstance(e, DownloadError) and "disk filled up" in e.message


def test_run_style_resolution_never_downloads_silently(hub, tmp_path):
    hub.add_file("org/repo", "lazy.gguf", b"GGUF" + b"\0" * 100)
    env = hub.env(tmp_path)
    code = ("from dspark_cli.models.refs import resolve_model\n"
            "from dspark_cli.errors import DsparkError\n"
            "try:\n    resolve_model('org/repo:lazy.gguf')\nexcept DsparkError as e:\n    print(e.message)\n"
            "print(resolve_model('org/repo:lazy.gguf', pull=True))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[0] == "org/repo:lazy.gguf is not downloaded yet"
    assert Path(lines[1]).name == "lazy.gguf"
    assert sum(1 for m, p, h in hub.requests if m == "GET") == 1
