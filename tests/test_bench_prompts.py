"""Benchmark prompts: the built-in suite and user files (Spec-Bench / MT-Bench JSON lines, plain text)."""

from __future__ import annotations

import json

import pytest

from dspark_cli.bench.prompts import builtin_prompts, load_prompts
from dspark_cli.errors import PromptError


def test_builtin_suite_covers_every_category_with_several_prompts():
    suite = builtin_prompts()
    cats = {}
    for p in suite:
        cats.setdefault(p.category, []).append(p)
    assert set(cats) == {"chat", "code", "summarization", "translation", "math", "qa", "short", "editing"}
    assert all(len(v) >= 2 for v in cats.values())
    assert len({p.id for p in suite}) == len(suite)
    assert all(p.text.strip() for p in suite)


def test_spec_bench_jsonl_uses_the_first_turn(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["first turn", "second turn"]}) + "\n\n"
        + json.dumps({"question_id": "x", "turns": ["only"]}) + "\n",
        encoding="utf-8",
    )
    got = load_prompts(f)
    assert [(p.id, p.category, p.text) for p in got] == [("81", "writing", "first turn"), ("x", "custom", "only")]


def test_plain_text_one_prompt_per_line(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("\ufeffWhy is the sky blue?\n\n  Name three rivers.  \n", encoding="utf-8")
    got = load_prompts(f)
    assert [(p.id, p.text) for p in got] == [("line-1", "Why is the sky blue?"), ("line-3", "Name three rivers.")]


def test_missing_file(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    f = tmp_path / "e.txt"
    f.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptError, match="empty"):
        load_prompts(f)


@pytest.mark.parametrize("bad_line, why", [
    ('{"question_id": 2, "turns": ["ok"', "not valid JSON"),
    ('{"question_id": 2, "turns": []}', "turns"),
    ('{"question_id": 2, "turns": [""]}', "first turn"),
    ('[1, 2]', "JSON object"),
    ('{"question_id": 2, "category": 5, "turns": ["ok"]}', "category"),
])
def test_malformed_line_is_named(tmp_path, bad_line, why):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "turns": ["fine"]}) + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match=f"line 2: .*{why}"):
        load_prompts(f)


def test_duplicate_ids(tmp_path):
    f = tmp_path / "q.jsonl"
    line = json.dumps({"question_id": 1, "turns": ["a"]})
    f.write_text(line + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match="more than once"):
        load_prompts(f)


def test_not_utf8(tmp_path):
    f = tmp_path / "q.txt"
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptError, match="UTF-8"):
        load_prompts(f)
