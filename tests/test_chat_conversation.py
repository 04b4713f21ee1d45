"""The conversation bookkeeping behind `dspark chat`, in process, on the demo pair's small model (its
tokenizer and ChatML template are the target's). No generation: answers are tokenized text standing in
for what the engine would have yielded."""

from __future__ import annotations

import json

import pytest

from dspark_cli.views import status_line, summary_line
from dspark_cli.chat.conversation import Conversation, Transcript, save_records
from dspark_cli.errors import PromptError
from dspark_cli.prompt import tokenize_prompt
from dspark_cli.engine.stats import GenerationStats


@pytest.fixture(scope="module")
def model(demo_paths):
    from dspark_cli.llama.model import Model

    m = Model(demo_paths[1], role="target", n_ctx=256, n_threads=1)
    yield m
    m.close()


def _answer(conv, model, text, finish="stop"):
    conv.end_turn(text, model.tokenize(text, add_special=False, parse_special=False), finish)


def test_second_turn_extends_the_first_token_for_token(model):
    conv = Conversation(model, system="Be brief.")
    t1 = conv.begin_turn("What is the capital of France?", reserve=24)
    assert t1.n_reusable == 0 and t1.tokens == tokenize_prompt(model, conv.template.render(conv._with_system(
        [{"role": "user", "content": "What is the capital of France?"}])).text)
    answer = model.tokenize("The capital of France is Paris.", add_special=False, parse_special=False)
    conv.end_turn("The capital of France is Paris.", answer, "stop")

    t2 = conv.begin_turn("And of Germany?", reserve=24)
    # Everything already in context is kept as is; only the tail is new: the end of turn 1 (the EOG the
    # engine stopped on), the new user message and the assistant header.
    assert t2.tokens[: len(t1.tokens) + len(answer)] == t1.tokens + answer
    assert t2.n_reusable == len(t1.tokens) + len(answer)
    tail = model.tokenize("<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n", add_special=False)
    assert t2.tokens[t2.n_reusable :] == tail
    # And on this template it is exactly what rendering the whole conversation gives.
    assert t2.tokens == tokenize_prompt(model, conv.template.render(conv._with_system(conv.messages + [{"role": "user", "content": "And of Germany?"}])).text)


def test_an_interrupted_answer_is_closed_by_the_template(model):
    conv = Conversation(model)
    t1 = conv.begin_turn("Tell me a story.", reserve=24)
    partial = model.tokenize("Once upon a", add_special=False, parse_special=False)
    conv.end_turn("Once upon a", partial, "interrupted")
    t2 = conv.begin_turn("Shorter, please.", reserve=24)
    im_end = model.tokenize("<|im_end|>", add_special=False)
    assert t2.tokens[len(t1.tokens) : len(t1.tokens) + len(partial) + 1] == partial + im_end
    assert conv.log[-2]["finish_reason"] == "interrupted"


def test_answer_whose_tokens_do_not_spell_its_text_rebuilds_the_prompt(model):
    # Ctrl-C between the two tokens of one UTF-8 character: the tokens hold a byte the text does not.
    conv = Conversation(model)
    conv.begin_turn("Say café.", reserve=24)
    conv.end_turn("caf", model.tokenize("café", add_special=False, parse_special=False), "interrupted")
    t2 = conv.begin_turn("Again.", reserve=24)
    assert t2.n_reusable == 0  # rendered and tokenized whole: text and tokens agree again


def test_system_change_and_reset(model):
    conv = Conversation(model)
    conv.begin_turn("Hi", reserve=24)
    _answer(conv, model, "Hello!")
    conv.set_system("You are a pirate.")
    t = conv.begin_turn("Who are you?", reserve=24)
    assert t.n_reusable == 0 and "pirate" in model.detokenize(t.tokens)
    _answer(conv, model, "A pirate.")
    conv.reset()
    assert conv.messages == [] and conv.system == "You are a pirate."
    assert [r["role"] for r in conv.log] == ["system"]
    t = conv.begin_turn("Again?", reserve=24)
    assert "pirate" in model.detokenize(t.tokens) and "Hello!" not in model.detokenize(t.tokens)


def test_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt(model):
    conv = Conversation(model, system="SYSTEM-MARK")
    long_answer = "word " * 40
    for i in range(10):
        t = conv.begin_turn(f"question {i}", reserve=32)
        if t.dropped_turns:
            break
        assert len(t.tokens) + 32 <= model.n_ctx and t.n_reusable > 0 or i == 0
        _answer(conv, model, long_answer, "length")
    assert t.dropped_turns >= 1 and t.n_reusable == 0
    assert len(t.tokens) + 32 <= model.n_ctx - model.n_ctx // 4  # room for more than one more turn
    text = model.detokenize(t.tokens)
    assert "SYSTEM-MARK" in text and "question 0" not in text and f"question {i}" in text
    # Nothing lost for /save: the log still has every message.
    assert [r["content"] for r in conv.log if r["role"] == "user"] == [f"question {k}" for k in range(i + 1)]


def test_a_message_larger_than_the_context_is_refused_without_harm(model):
    conv = Conversation(model)
    conv.begin_turn("Hi", reserve=24)
    _answer(conv, model, "Hello!")
    with pytest.raises(PromptError):
        conv.begin_turn("blah " * 400, reserve=24)
    assert len(conv.messages) == 2
    assert conv.begin_turn("Still there?", reserve=24).n_reusable > 0


def test_a_huge_message_after_many_turns_is_refused_without_retokenizing_per_turn(model):
    """After 8 turns a 2 MB line took 16 s to refuse (3.8 s in a fresh chat): the conversation was tokenized
    again for every turn dropped to make room. The message alone is judged first: a paste that cannot fit
    is refused from its size alone, one that might is tokenized at most twice."""
    conv = Conversation(model, system="Be brief.")
    for i in range(8):
        conv.begin_turn(f"q{i}", reserve=8)
        _answer(conv, model, "ok")
    assert len(conv.messages) == 16
    sizes = []
    real = model.tokenize

    def counting(text, **kw):
        sizes.append(len(text))
        return real(text, **kw)

    model.tokenize = counting
    try:
        with pytest.raises(PromptError, match="at least"):
            conv.begin_turn("word " * 400_000, reserve=8)  # 2 MB
        assert not [n for n in sizes if n > 10_000]  # refused on its size: never tokenized
        with pytest.raises(PromptError, match="context holds"):
            conv.begin_turn("word " * 2_000, reserve=8)  # 10 kB: under the size bound, over the context
        assert len([n for n in sizes if n > 5_000]) <= 2
    finally:
        del model.tokenize
    assert len(conv.messages) == 16 and conv.begin_turn("Still there?", reserve=8).n_reusable > 0


def test_transcript_and_save_write_json_lines(tmp_path):
    path = tmp_path / "sub" / "t.jsonl"
    tr = Transcript(path)
    tr.write({"role": "user", "content": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"role": "user", "content": "é"}  # flushed already
    tr.close()
    out = save_records(tmp_path / "s.jsonl", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert [json.loads(x)["content"] for x in out.read_text().splitlines()] == ["a", "b"]


def test_status_and_summary_fit_narrow_terminals():
    s = GenerationStats(method="draft", n_prompt=120, n_prompt_evaluated=15, n_generated=40, n_drafted=50,
                        n_accepted=45, n_target_steps=10, t_prompt=0.12)
    s.t_end = s.t_start + 0.8
    wide = summary_line(s, "stop", 200)
    assert "40 tokens" in wide and "50.0 tok/s" in wide and "acceptance 90%" in wide and "prompt 15 new of 120" in wide
    for width in (20, 30, 40, 60, 80):
        assert len(summary_line(s, "interrupted", width)) <= width
        assert len(status_line(s, width)) <= width
        assert "tok/s" in status_line(s, width)
