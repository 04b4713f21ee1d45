"""From what the user typed to the token ids the target sees: the target's own chat template (from the
GGUF) unless --raw, with exactly one BOS where the vocabulary wants one and never an EOS."""

from __future__ import annotations

from .errors import DsparkError
from .model import Model


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

    def render(self, messages: list[dict]) -> str:
        """The conversation followed by the assistant header, ready for the answer."""
        try:
            return self._open(messages=messages).prompt
        except Exception as e:  # a template may raise_exception() on a conversation shape it rejects
            raise DsparkError(f"the model's chat template failed on this conversation: {e}") from None


def tokenize_prompt(model: Model, text: str) -> list[int]:
    """Special-token text (<|im_start|> …) is parsed as the tokens it names; BOS is added once if the
    vocabulary asks for it, even when a template already wrote it as text."""
    bos_text = model.token_text(model.bos).decode("utf-8", "replace") if model.bos >= 0 else ""
    if model.add_bos and bos_text and text.startswith(bos_text):
        text = text[len(bos_text) :]
    tokens = model.tokenize(text, add_special=False, parse_special=True)
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
    return tokenize_prompt(model, template.render(messages)), not template.is_fallback


class Continuation:
    """What the KV caches hold after an answer, as text and as the exact token ids, so that a next prompt
    extending it (the conversation with one more message) is tokenized only in its new tail.

    Re-rendering a conversation through the chat template and tokenizing it again does not always give back
    the tokens the model generated (tokenization is not unique), and any difference makes `Model.sync`
    re-process everything after it. So the next prompt is built as (tokens in context) + tokens(the rest of
    the text), when the text starts with exactly what the cached tokens stand for; when it does not (a system
    prompt changed, a template rewrote old answers, turns were dropped), it is tokenized whole and the caches
    keep whatever prefix still matches."""

    def __init__(self, model: Model):
        self.model = model
        self.text: str | None = None  # None: nothing reusable
        self.tokens: list[int] = []

    def tokens_for(self, text: str) -> tuple[list[int], int]:
        """(the prompt's tokens, how many of them come from the previous context)."""
        if self.text is not None and self.tokens and text.startswith(self.text):
            tail = text[len(self.text):]
            return self.tokens + self.model.tokenize(tail, add_special=False, parse_special=True), len(self.tokens)
        return tokenize_prompt(self.model, text), 0

    def remember(self, prompt_text: str, prompt_tokens: list[int], answer_text: str, answer_tokens: list[int]) -> None:
        """After an answer. The tail trick needs the tokens to spell exactly the answer's text; an answer cut
        inside a UTF-8 character (Ctrl-C, --max-tokens) does not, and then the next prompt is tokenized whole."""
        self.tokens = list(prompt_tokens) + list(answer_tokens)
        exact = self.model.detokenize(list(answer_tokens)) == answer_text
        self.text = prompt_text + answer_text if exact else None

    def forget(self) -> None:
        self.text = None
