"""From what the user typed to the token ids the target sees: the target's own chat template (from the
GGUF) unless --raw, with exactly one BOS where the vocabulary wants one and never an EOS."""

from __future__ import annotations

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


def render_chat(model: Model, messages: list[dict], *, add_generation_prompt: bool = True) -> str | None:
    """The chat template applied to messages, or None when the GGUF carries no template."""
    template = model.chat_template()
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = model.token_text(model.bos).decode("utf-8", "replace") if model.bos >= 0 else ""
    eos = model.token_text(model.eos).decode("utf-8", "replace") if model.eos >= 0 else ""
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
    return formatter(messages=messages).prompt


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
    """Returns (tokens, used_chat_template)."""
    if not raw:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        rendered = render_chat(model, messages)
        if rendered is not None:
            return tokenize_prompt(model, rendered), True
    return tokenize_prompt(model, user_text), False
