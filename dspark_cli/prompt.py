"""From what the user typed to the token ids the target sees: the target's own chat template (from the
GGUF) unless --raw, with exactly one BOS where the vocabulary wants one and never an EOS.

Only the template writes control tokens (<|im_start|>, <|im_end|>, ...). A message that contains their text
("Hi<|im_end|>\n<|im_start|>system\n...") gets it as plain text, as OpenAI's API treats message text, so a
user cannot open a turn of another role. A raw prompt (`--raw`, `raw=True`, /v1/completions) is the
documented way to write control tokens yourself: its control-token text is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DsparkError, PromptError
from .llama.model import Model

# llama.cpp's token attributes (llama.h): the tokens its tokenizer only parses with parse_special=True, and
# the ones that swallow whitespace beside them.
_ATTR_UNKNOWN, _ATTR_CONTROL = 1 << 0, 1 << 3
_ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 7, 1 << 8
# Below this many control tokens in one text llama.cpp's own parsing is as fast as ours; past it, its cost
# grows with (control tokens x text length): 8,000 chat messages took 0.78 s, 50,000 most of two minutes.
_OWN_PARSE_BELOW = 64


def clean_text(text: str) -> str:
    """Text the user typed, as valid Unicode: bytes that are not UTF-8 (which Python keeps in command-line
    arguments as lone surrogates) become U+FFFD, so they can be tokenized, printed and saved."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes as they arrived
    except UnicodeEncodeError:  # surrogates that never were bytes
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


# Used when a GGUF carries no chat template, as llama.cpp does: ChatML.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Rendered:
    """A prompt's text and the spans of it (start, end) that are message text holding control-token text:
    those are tokenized as plain text."""

    text: str
    protect: tuple[tuple[int, int], ...] = ()


class ChatTemplate:
    """The model's Jinja chat template (ChatML when the GGUF has none: `is_fallback`), compiled once. The
    one path from messages to prompt text, for `run`, `chat`, the API and the benchmark alike."""

    def __init__(self, model: Model):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = model.chat_template()
        self.is_fallback = not template
        template = template or FALLBACK_TEMPLATE
        bos = model.token_text(model.bos).decode("utf-8", "replace") if model.bos >= 0 else ""
        eos = model.token_text(model.eos).decode("utf-8", "replace") if model.eos >= 0 else ""
        self._open = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        self._controls = control_tokens(model)

    def render(self, messages: list[dict]) -> Rendered:
        """The conversation followed by the assistant header, ready for the answer, with the spans of the
        messages whose text holds control-token text."""
        text = self._text(messages)
        forged = [i for i, m in enumerate(messages) if self._controls.pattern and self._controls.pattern.search(m["content"])]
        if not forged:
            return Rendered(text)
        return Rendered(text, self._spans(messages, text, forged))

    def _text(self, messages: list[dict]) -> str:
        try:
            return self._open(messages=messages).prompt
        except Exception as e:  # a template may raise_exception() on a conversation shape it rejects
            raise DsparkError(f"the model's chat template failed on this conversation: {e}") from None

    def _spans(self, messages: list[dict], text: str, forged: list[int]) -> tuple[tuple[int, int], ...]:
        """Where the messages `forged` sit in `text`: the template is rendered once more with a marker in
        place of each message's text, and the marked rendering, markers replaced by the texts (as given, or
        trimmed, as some templates do), must give `text` back exactly."""
        marks = [f"\ue000dspark{i}\ue001" for i in range(len(messages))]
        marked = self._text([{**m, "content": marks[i]} for i, m in enumerate(messages)])
        found = sorted((marked.find(mark), i) for i, mark in enumerate(marks) if mark in marked)
        if all(marked.count(marks[i]) == 1 for _, i in found):
            for shape in (lambda c: c, str.strip):
                out, spans, pos = [], [], 0
                for at, i in found:
                    out.append(marked[pos:at])
                    start = sum(map(len, out))
                    out.append(shape(messages[i]["content"]))
                    if i in forged:
                        spans.append((start, start + len(out[-1])))
                    pos = at + len(marks[i])
                out.append(marked[pos:])
                if "".join(out) == text:
                    return tuple(spans)
        token = self._controls.pattern.search(messages[forged[0]]["content"]).group(0)
        raise PromptError(f"message {forged[0]} holds the text of the control token {token!r}, and this model's "
                          "chat template changes message text in a way dspark cannot follow to keep it plain text",
                          hint="remove it from the message, or send a raw prompt")


@dataclass(frozen=True)
class ControlTokens:
    """A vocabulary's control tokens (the ones only parse_special turns into ids): text -> id, and one
    regex finding them, longest first, as llama.cpp matches them. `strips`: some of them swallow whitespace
    next to them (their LSTRIP/RSTRIP attribute), which only llama.cpp's own parsing reproduces."""

    ids: dict
    pattern: re.Pattern | None
    strips: bool


def control_tokens(model: Model) -> ControlTokens:
    cached = getattr(model, "_control_tokens", None)
    if cached is None:
        ids, strips = {}, False
        for tok in range(model.n_vocab):
            attr = model.token_attr(tok)
            if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                text = model.token_text(tok).decode("utf-8", "replace")
                if text:
                    ids.setdefault(text, tok)
                    strips = strips or bool(attr & (_ATTR_LSTRIP | _ATTR_RSTRIP))
        pattern = re.compile("|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True))) if ids else None
        cached = model._control_tokens = ControlTokens(ids, pattern, strips)
    return cached


def tokenize_text(model: Model, text: str, protect: tuple[tuple[int, int], ...] = ()) -> list[int]:
    """`text`'s tokens with its control-token text parsed as the tokens it names, except inside the
    `protect` spans (plain text there). Where nothing is protected this is llama.cpp's parse_special
    tokenization, and linear in the text where llama.cpp's is not (_OWN_PARSE_BELOW): the text is cut at its
    control tokens and each piece between them tokenized as llama.cpp tokenizes such a fragment (user-defined
    tokens are still matched there; with an SPM vocabulary it gets the same space prefix)."""
    controls = control_tokens(model)
    if controls.pattern is None:
        return model.tokenize(text, add_special=False, parse_special=False)
    if controls.strips:
        # Control tokens that eat the whitespace beside them: only llama.cpp's own parsing places them exactly.
        # Protected spans are cut out and tokenized as plain text (quadratic for huge texts; such vocabularies
        # are rare).
        tokens, pos = [], 0
        for a, b in protect:
            if pos < a:
                tokens += model.tokenize(text[pos:a], add_special=False, parse_special=True)
            tokens += model.tokenize(text[a:b], add_special=False, parse_special=False)
            pos = b
        return tokens + (model.tokenize(text[pos:], add_special=False, parse_special=True) if pos < len(text) else [])
    found = [m for m in controls.pattern.finditer(text) if not any(a < m.end() and m.start() < b for a, b in protect)]
    if not protect and len(found) < _OWN_PARSE_BELOW:
        return model.tokenize(text, add_special=False, parse_special=True)
    tokens, pos = [], 0
    for m in found:
        if pos < m.start():
            tokens += model.tokenize(text[pos:m.start()], add_special=False, parse_special=False)
        tokens.append(controls.ids[m.group(0)])
        pos = m.end()
    if pos < len(text):
        tokens += model.tokenize(text[pos:], add_special=False, parse_special=False)
    return tokens


def min_tokens(model: Model, text: str) -> int:
    """A lower bound on the tokens `text` takes, without tokenizing it: its UTF-8 bytes over the longest
    token's text (plus a space prefix). Lets a paste of megabytes be refused at once; 0 for texts too short to
    ever fill the model's context, which never pay for the vocabulary scan."""
    if 4 * len(text) < model.n_ctx:
        return 0
    longest = getattr(model, "_longest_token", None)
    if longest is None:
        longest = model._longest_token = 1 + max(len(model.token_text(t)) for t in range(model.n_vocab))
    return len(text.encode("utf-8", "surrogatepass")) // longest


def tokenize_prompt(model: Model, text: str, protect: tuple[tuple[int, int], ...] = ()) -> list[int]:
    """A whole prompt's tokens (tokenize_text); BOS is added once if the vocabulary asks for it, even when a
    template already wrote it as text."""
    bos_text = model.token_text(model.bos).decode("utf-8", "replace") if model.bos >= 0 else ""
    if model.add_bos and bos_text and text.startswith(bos_text):
        cut = len(bos_text)
        text = text[cut:]
        protect = tuple((a - cut, b - cut) for a, b in protect)
    tokens = tokenize_text(model, text, protect)
    if model.add_bos and model.bos >= 0:
        tokens.insert(0, model.bos)
    return tokens


def build_prompt(model: Model, user_text: str, *, raw: bool = False, system: str | None = None) -> tuple[list[int], bool]:
    """(tokens, used the model's own chat template): one user message (and a system prompt) through the
    template, ChatML when the GGUF has none; raw sends the text as it is."""
    if raw:
        return tokenize_prompt(model, user_text), False
    template = ChatTemplate(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    rendered = template.render(messages)
    return tokenize_prompt(model, rendered.text, rendered.protect), not template.is_fallback


class Continuation:
    """What the KV caches hold after an answer, as text and as the exact token ids, so that a next prompt
    extending it (the conversation with one more message) is tokenized only in its new tail.

    Re-rendering a conversation through the chat template and tokenizing it again does not always give back
    the tokens the model generated (tokenization is not unique), and any difference makes `Model.sync`
    re-process everything after it. So the next prompt is built as (tokens in context) + tokens(the rest of
    the text), when the text starts with exactly what the cached tokens stand for; when it does not (a system
    prompt changed, a template rewrote old answers, turns were dropped), it is tokenized whole and the caches
    keep whatever prefix still matches. `keep` conversations are remembered, the newest first (a server
    batching several sequences keeps one per slot); the longest one the prompt extends is used."""

    def __init__(self, model: Model, keep: int = 1):
        self.model = model
        self.keep = keep
        self._known: list[tuple[str, list[int]]] = []  # (text, its exact tokens), newest first

    def tokens_for(self, prompt: Rendered) -> tuple[list[int], int]:
        """(the prompt's tokens, how many of them come from a previous context)."""
        text = prompt.text
        known = [(t, toks) for t, toks in self._known if toks and text.startswith(t)]
        if known:
            prev, toks = max(known, key=lambda k: len(k[0]))
            cut = len(prev)
            protect = tuple((max(a - cut, 0), b - cut) for a, b in prompt.protect if b > cut)
            return toks + tokenize_text(self.model, text[cut:], protect), len(toks)
        return tokenize_prompt(self.model, text, prompt.protect), 0

    def remember(self, prompt_text: str, prompt_tokens: list[int], answer_text: str, answer_tokens: list[int]) -> None:
        """After an answer. The tail trick needs the tokens to spell exactly the answer's text; an answer cut
        inside a UTF-8 character (Ctrl-C, --max-tokens) does not, and then the next prompt is tokenized whole."""
        tokens = list(prompt_tokens) + list(answer_tokens)
        exact = self.model.detokenize(list(answer_tokens)) == answer_text
        # What this answer extends is superseded by it (its slot's cache moved on).
        self._known = [(t, k) for t, k in self._known if not (prompt_text + answer_text).startswith(t)]
        if exact:
            self._known.insert(0, (prompt_text + answer_text, tokens))
        del self._known[self.keep :]

    def forget(self) -> None:
        self._known = []
