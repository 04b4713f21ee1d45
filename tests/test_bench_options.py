"""`dspark bench` option parsing that needs no model: draft lengths and methods."""

from __future__ import annotations

import pytest

from dspark_cli.commands.bench import _int_list, _methods
from dspark_cli.errors import UsageError


def test_draft_lengths_parse_and_dedupe():
    assert _int_list("8", "--draft-max") == [8]
    assert _int_list("2, 4,8,16,4", "--draft-max") == [2, 4, 8, 16]
    for bad in ("0", "-1", "2,,4", "four"):
        with pytest.raises(UsageError, match="--draft-max"):
            _int_list(bad, "--draft-max")


def test_default_method_follows_the_models():
    # With a draft model: the hybrid (model + prompt lookup), what `dspark run` uses.
    assert _methods(None, None, None, None) == ["hybrid"]  # the demo pair
    assert _methods(None, "d.gguf", "t.gguf", None) == ["hybrid"]
    assert _methods(None, None, None, "some-pair") == ["hybrid"]
    assert _methods(None, "lookup", None, None) == ["lookup"]
    assert _methods(None, None, "t.gguf", None) == ["lookup"]  # a target with no draft named


def test_methods_are_checked():
    assert _methods("lookup, draft,lookup", None, None, None) == ["lookup", "draft"]
    with pytest.raises(UsageError, match="unknown method"):
        _methods("eagle", None, None, None)
    with pytest.raises(UsageError, match="needs a draft model"):
        _methods("draft", "none", None, None)
    with pytest.raises(UsageError, match="needs a draft model"):
        _methods("draft", None, "t.gguf", None)
    with pytest.raises(UsageError, match="needs a draft model"):
        _methods("hybrid", "lookup", None, None)


def test_methods_may_take_the_memory():
    assert _methods("hybrid,hybrid+memory", None, None, None) == ["hybrid", "hybrid+memory"]
    assert _methods("lookup+memory", "lookup", None, None) == ["lookup+memory"]
    with pytest.raises(UsageError, match="memory is off"):
        _methods("hybrid+memory", None, None, None, memory_mb=0)
    with pytest.raises(UsageError, match="needs a draft model"):
        _methods("draft+memory", "lookup", None, None)
    with pytest.raises(UsageError, match="unknown method"):
        _methods("memory", None, None, None)
