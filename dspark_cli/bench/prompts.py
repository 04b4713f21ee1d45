"""Benchmark prompts: the built-in suite, or a user's file read before any model is loaded.

A file is JSON lines in the Spec-Bench / MT-Bench shape ({"question_id", "category", "turns": [...]}; only
the first turn is used, as a one-shot bench cannot replay a conversation) when its first non-blank line
starts with "{", and otherwise plain text, one prompt per line. Every problem names the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .suite import REPETITIVE, SUITE
from ..errors import PromptError

TEXT_CATEGORY = "custom"  # category of plain-text prompts and of JSON lines without one


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    text: str


SUITES = {"standard": SUITE, "repetitive": REPETITIVE}  # the built-in suites by the names --suite takes


def builtin_prompts(name: str = "standard") -> list[BenchPrompt]:
    return [BenchPrompt(pid, cat, text) for pid, cat, text in SUITES[name]]


def load_prompts(path: str | Path) -> list[BenchPrompt]:
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"prompts file not found: {p}") from None
    except IsADirectoryError:
        raise PromptError(f"prompts file is a directory: {p}") from None
    except OSError as e:
        raise PromptError(f"cannot read prompts file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise PromptError(f"prompts file {p} is not UTF-8 text (byte {e.start})") from None
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), None)
    if first is None:
        raise PromptError(f"prompts file {p} is empty", hint="one prompt per line, or JSON lines with \"turns\"")
    prompts = _parse_jsonl(p, lines) if first.startswith("{") else _parse_text(p, lines)
    ids = [bp.id for bp in prompts]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise PromptError(f"prompts file {p}: question_id {dup!r} appears more than once")
    return prompts


def _parse_text(path: Path, lines: list[str]) -> list[BenchPrompt]:
    # Blank lines separate nothing and are skipped; line numbers in ids let a reader find the prompt.
    return [BenchPrompt(f"line-{n}", TEXT_CATEGORY, ln.strip()) for n, ln in enumerate(lines, 1) if ln.strip()]


def _parse_jsonl(path: Path, lines: list[str]) -> list[BenchPrompt]:
    out: list[BenchPrompt] = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue

        def bad(why: str) -> PromptError:
            return PromptError(f"prompts file {path}, line {n}: {why}",
                               hint='each line: {"question_id": 1, "category": "chat", "turns": ["..."]}')

        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise bad("expected a JSON object")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns:
            raise bad('"turns" must be a non-empty list of strings')
        first = turns[0]
        if not isinstance(first, str) or not first.strip():
            raise bad('the first turn must be a non-empty string')
        qid = obj.get("question_id", f"line-{n}")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise bad('"question_id" must be a string or an integer')
        cat = obj.get("category", TEXT_CATEGORY)
        if not isinstance(cat, str) or not cat.strip():
            raise bad('"category" must be a non-empty string')
        out.append(BenchPrompt(str(qid), cat.strip(), first))
    return out
