"""The draft at its fastest: a re-encoded copy is derived and measured once per source file and build, the verdict
reused, measured again when the source changes, and the output stays the target's with a derived draft."""

from __future__ import annotations

import json
import shutil

import pytest

import dspark_cli as dspark
from dspark_cli.llama.model import Model
from dspark_cli.llama.quantize import requantize
from dspark_cli.models.derive import fastest_draft

PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def target(demo_paths):
    # A 64-token batch (the context is rounded up to 256): the measurement's calibration text is cut to one batch,
    # 64 tokens instead of 192, as on any target with a small batch; every candidate is still measured on it.
    m = Model(demo_paths[0], role="target", n_ctx=64)
    yield m
    m.close()


def test_the_verdict_is_reused_and_redone_when_the_source_changes(demo_paths, target, tmp_path, capsys):
    source = tmp_path / "draft.gguf"
    shutil.copy(demo_paths[1], source)
    cache = tmp_path / "derived"
    first = fastest_draft(source, target, threads=None, directory=cache)
    said = capsys.readouterr().err
    assert "measuring whether" in said and "draft draft.gguf:" in said
    (verdict,) = cache.glob("*.json")
    data = json.loads(verdict.read_text())
    assert set(data["figures"]) == {"as-is", "q4_0", "q4_0-head"}
    for f in data["figures"].values():
        assert 0.0 <= f["agreement"] <= 1.0 and f["step_ms"] > 0
    assert data["figures"]["as-is"]["agreement"] > 0.5  # the demo draft is the target's own weights, quantized
    kept = {p.name for p in cache.glob("*.gguf")}
    assert kept == ({first.name} if first != source else set())  # only the winner's file stays

    again = fastest_draft(source, target, threads=None, directory=cache)
    assert again == first and "measuring" not in capsys.readouterr().err  # reused: nothing measured

    requantize(demo_paths[1], source, __import__("llama_cpp").LLAMA_FTYPE_MOSTLY_Q8_0)  # the source changes
    fastest_draft(source, target, threads=None, directory=cache)
    assert "measuring whether" in capsys.readouterr().err
    assert len(list(cache.glob("*.json"))) == 1  # the verdict on the old content is gone with its copy
    assert next(cache.glob("*.json")) != verdict


def test_a_draft_that_cannot_be_re_encoded_is_kept_as_it_is(tiny_paths, tiny_models, tmp_path, capsys):
    # The synthetic pair's rows (a few dozen wide) do not fit Q4_0's 32-wide blocks everywhere: whatever the
    # quantizer says, the file itself is used and the load goes on.
    target, _ = tiny_models
    path = fastest_draft(tiny_paths[1], target, threads=None, directory=tmp_path)
    assert path.is_file()
    assert "draft" in capsys.readouterr().err


def test_greedy_output_is_the_targets_with_a_derived_draft(demo_paths, tmp_path):
    import llama_cpp

    derived = tmp_path / "draft-q4_0-head.gguf"
    requantize(demo_paths[1], derived, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, head_type=llama_cpp.GGML_TYPE_Q4_0)
    with dspark.load(str(demo_paths[0]), draft="none", quiet=True) as alone:
        reference = alone.complete(PROMPT, max_tokens=24).tokens
    with dspark.load(str(demo_paths[0]), draft=str(derived), draft_as_is=True, quiet=True) as pair:
        assert pair.draft_model.path == derived
        result = pair.complete(PROMPT, max_tokens=24)
    assert result.tokens == reference
    assert result.stats.n_drafted > 0


def test_draft_as_is_loads_the_file_itself(demo_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_DERIVED", str(tmp_path))
    with dspark.load(draft_as_is=True, quiet=True) as pair:
        assert pair.draft_model.path == demo_paths[1]
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
