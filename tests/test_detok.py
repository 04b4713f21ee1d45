"""Incremental detokenization: UTF-8 characters split across tokens are never printed broken, and stop
strings are never printed, not even in part."""

from dspark_cli.engine.detok import TextStream

TEXT = "naïve café — 🎉🚀 日本語のテキスト, Ελληνικά, ∑∫√ and emoji 👩‍💻 at the end"


def test_split_utf8_from_the_real_tokenizer(demo_models):
    target, _ = demo_models
    tokens = target.tokenize(TEXT, add_special=False)
    pieces = [target.piece(t) for t in tokens]
    # The byte-level BPE really does split characters: some pieces are not valid UTF-8 on their own.
    broken = 0
    for p in pieces:
        try:
            p.decode("utf-8")
        except UnicodeDecodeError:
            broken += 1
    assert broken >= 2
    stream = TextStream()
    out = [stream.push(p) for p in pieces] + [stream.flush()]
    assert all("\ufffd" not in o for o in out)
    assert "".join(out) == TEXT == stream.text


def test_incomplete_tail_is_dropped_at_the_end():
    # An answer cut by --max-tokens inside a character ends before it, not with U+FFFD.
    stream = TextStream()
    assert stream.push(b"ok " + "é".encode()[:1]) == "ok "
    assert stream.flush() == "" and stream.text == "ok "


def test_invalid_bytes_inside_the_text_become_replacement_chars():
    stream = TextStream()
    assert stream.push(b"a\xffb") == "a\ufffdb"
    assert stream.flush() == ""


def test_stop_string_split_across_pieces_is_never_printed():
    stream = TextStream(stop=["</answer>"])
    shown = [stream.push(p.encode()) for p in ["The result", " is 4</", "ans", "wer> and more"]]
    assert "".join(shown) == "The result is 4"
    assert stream.stopped
    assert stream.push(b"more") == "" and stream.flush() == ""


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    stream = TextStream(stop=["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.push(b"ART") == "START"
    assert stream.flush() == "" and stream.text == "go START"
    assert not stream.stopped
