"""A draft of another vocabulary drafts through text (engine/through_text.py), and the output stays the target's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dspark_cli as dspark
from dspark_cli.engine.through_text import TextDrafter
from dspark_cli.llama.model import Model
from dspark_cli.llama.vocab import vocab_report

from synthetic import permute_vocabulary

QUESTION = "Write a Python function that checks whether a number is prime."


@pytest.fixture(scope="module")
def permuted_draft(demo_paths, tmp_path_factory):
    """The demo draft with its token ids reordered: the same model and text, another vocabulary."""
    return permute_vocabulary(demo_paths[1], tmp_path_factory.mktemp("permuted") / "permuted-draft.gguf")


@pytest.fixture(scope="module")
def alone_greedy(demo_paths) -> list[int]:
    """The demo target alone's greedy answer to QUESTION, 24 tokens: what the pairs below must reproduce (computed
    once for the module, not once a test)."""
    with dspark.load(demo_paths[0], draft="none", ctx_size=1024, quiet=True) as pair:
        return pair.complete(QUESTION, max_tokens=24).tokens


def test_the_vocabulary_check_is_a_report(demo_models, demo_paths, permuted_draft, tiny_paths):
    target, _ = demo_models

    def report_on(path):
        draft = Model(path, role="draft", vocab_only=True)
        try:
            return vocab_report(target, draft)
        finally:
            draft.close()

    assert report_on(demo_paths[1]) == ("same vocabulary", False)
    report, through_text = report_on(permuted_draft)
    assert through_text and report.startswith("different vocabulary (token 100 differs")
    assert report.endswith("drafting through text")
    assert report_on(tiny_paths[1])[1]  # another tokenizer type altogether


def test_text_crosses_between_the_vocabularies(demo_models, permuted_draft):
    target, _ = demo_models
    draft = Model(permuted_draft, role="draft", n_ctx=512)
    try:
        drafter = TextDrafter(draft, target)
        seq = target.tokenize("The quick brown fox jumps over the lazy dog, again and again.", add_special=False)
        own = drafter.own(seq)
        assert own != seq and draft.detokenize(own) == target.detokenize(seq)
        # Its drafts come back as target tokens; the last one dropped while the draft may go on (a cut word).
        words = draft.tokenize(" jumps over the lazy", add_special=False)
        assert drafter.to_target(words, ended=True) == target.tokenize(" jumps over the lazy", add_special=False)
        assert drafter.to_target(words, ended=False) == target.tokenize(" jumps over the", add_special=False)
        assert drafter.to_target([], ended=False) == []
        # The answer's text is converted again as it grows; the prompt's once.
        longer = seq + target.tokenize(" Then it sleeps.", add_special=False)
        assert draft.detokenize(drafter.own(longer)) == target.detokenize(longer)
    finally:
        draft.close()


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.8, 11)], ids=["greedy", "sampled"])
def test_identical_to_the_target_alone(demo_paths, permuted_draft, temperature, seed):
    # 32 tokens (48 before): the draft's tokens still make most of each answer (asked: more than a quarter)
    options = dict(max_tokens=32, temperature=temperature, top_k=40, top_p=0.95, min_p=0.05, seed=seed)
    with dspark.load(demo_paths[0], draft="none", ctx_size=1024, quiet=True) as pair:
        alone = pair.complete(QUESTION, **options)
    with dspark.load(demo_paths[0], draft=permuted_draft, ctx_size=1024, quiet=True) as pair:
        assert pair.drafter.through_text and pair.method == "hybrid"
        spec = pair.complete(QUESTION, fixed=True, draft_max=4, **options)  # drafting every step
        again = pair.complete(QUESTION, fixed=True, draft_max=4, **options)  # its caches reused
    assert spec.tokens == alone.tokens and again.tokens == alone.tokens
    assert spec.stats.accepted_by.get("draft", 0) > len(alone.tokens) // 4, spec.stats.as_dict()


def test_a_draft_of_another_tokenizer_type_drafts_junk_and_changes_nothing(demo_paths, tiny_paths, alone_greedy):
    with dspark.load(demo_paths[0], draft=tiny_paths[1], ctx_size=1024, quiet=True) as pair:
        spec = pair.complete(QUESTION, max_tokens=24, fixed=True, draft_max=4)  # 24 tokens (32 before)
    assert spec.tokens == alone_greedy
    assert spec.stats.n_draft_steps > 0


def test_batched_generations_draft_without_it(demo_paths, permuted_draft, alone_greedy):
    with dspark.load(demo_paths[0], draft=permuted_draft, ctx_size=512, parallel=2, quiet=True) as pair:
        spec = pair.complete(QUESTION, max_tokens=24, fixed=True, draft_max=4)
    assert spec.tokens == alone_greedy and spec.stats.n_draft_steps == 0


def test_the_cli_says_it_drafts_through_text(demo_paths, permuted_draft):
    proc = subprocess.run([sys.executable, "-m", "dspark_cli", "run", "-m", str(demo_paths[0]), "-d",
                           str(permuted_draft), "--temp", "0", "-n", "8", "--json", QUESTION],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "different vocabulary" in proc.stderr and "drafting through text" in proc.stderr
    assert json.loads(proc.stdout)["method"] == "hybrid"


def test_bench_and_the_api_draft_through_text_too(demo_paths, permuted_draft, tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text(QUESTION + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "dspark_cli", "bench", "-m", str(demo_paths[0]), "-d",
                           str(permuted_draft), "--methods", "draft", "--draft-fixed", "--draft-max", "4", "-r", "1",
                           "--no-warmup", "-n", "24", "--prompts", str(prompts), "--json", "-"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["identical"] is True
    assert report["variants"][0]["accepted_by"].get("draft", 0) > 6, report["variants"][0]
    with dspark.load(demo_paths[0], draft=permuted_draft, ctx_size=512, quiet=True) as pair:
        tokens = pair.tokens(QUESTION)
        from dspark_cli.engine.sampling import SamplingParams

        events = list(pair.generate_tokens(tokens, params=SamplingParams(), max_tokens=24, fixed=True, draft_max=4,
                                           method="draft"))
        assert events[-1].stats.accepted_by.get("draft", 0) > 6, events[-1].stats.as_dict()
