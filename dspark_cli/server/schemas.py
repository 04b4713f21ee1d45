"""OpenAI's API shapes: reading a request (every field checked, with OpenAI's error object for what is wrong)
and writing responses, stream chunks, usage and llama-server's `timings`."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from ..engine.sampling import SamplingParams
from ..engine.stats import FINISH_CONTEXT, FINISH_LENGTH, FINISH_STOP, GenerationStats

FINISH = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_CONTEXT: "length"}  # the engine's reasons in OpenAI's words


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _no_tools(body: dict) -> bool:
    return not body.get("tools") and not body.get("functions")


# Fields dspark cannot honour, each with the values that ask for nothing (clients send them by default) and
# what a refusal says. null is always a no-op; anything else a 400 naming the field.
NOOP = {
    "tools": (lambda v, b: v == [], "only an empty list: dspark serve has no tool calling"),
    "functions": (lambda v, b: v == [], "only an empty list: dspark serve has no function calling"),
    "tool_choice": (lambda v, b: v == "none" or (v == "auto" and _no_tools(b)),
                    "only \"none\" (or \"auto\" without tools): dspark serve has no tool calling"),
    "function_call": (lambda v, b: v == "none" or (v == "auto" and _no_tools(b)),
                      "only \"none\" (or \"auto\" without functions): dspark serve has no function calling"),
    "parallel_tool_calls": (lambda v, b: isinstance(v, bool) and _no_tools(b),
                            "only true or false, and without tools: dspark serve has no tool calling"),
    "logprobs": (lambda v, b: v is False, "only false: dspark serve returns no log probabilities"),
    "top_logprobs": (lambda v, b: v == 0 and type(v) is int, "only 0: dspark serve returns no log probabilities"),
    "logit_bias": (lambda v, b: v == {}, "only an empty object: dspark serve has no logit bias"),
    "response_format": (lambda v, b: isinstance(v, dict) and v.get("type") == "text" and set(v) == {"type"},
                        "only {\"type\": \"text\"}: dspark serve answers in plain text"),
    "modalities": (lambda v, b: v == ["text"], "only [\"text\"]: dspark serve answers in text"),
    "echo": (lambda v, b: v is False, "only false: dspark serve does not echo the prompt"),
    "best_of": (lambda v, b: v == 1 and type(v) is int, "only 1: dspark serve generates one answer per request"),
    "suffix": (lambda v, b: v == "", "only an empty string: dspark serve has no insertion"),
    "audio": (lambda v, b: False, "dspark serve answers in text"),
    "prediction": (lambda v, b: False, "dspark serve has no predicted outputs"),
}
UNSUPPORTED = tuple(NOOP)


def check_text(body) -> None:
    """A 400 for a lone surrogate (JSON's "\\ud83d" escape without its pair) in any string of the body, key or
    value: no model can read it, and no answer could quote it back in UTF-8."""
    stack = [(body, "the request", None)]
    while stack:
        value, where, param = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"{where} is not valid text: a lone surrogate {value[e.start]!r} at character "
                               f"{e.start}", param=param, code="invalid_text") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                name = k if param is None else f"{where}.{k}"  # messages[0].content
                stack.append((k, f"a key in {where}", param))
                stack.append((v, name, param or k))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", param) for i, v in enumerate(value))


@dataclass
class GenerationRequest:
    """One request, checked: what to generate and how."""

    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    model: str
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05  # llama-server's default
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default, *, kind=float, low=None, high=None, high_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}", name)
    value = kind(value)
    if kind is float and not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number", name)
    if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
        bounds = (f"at least {low}" if high is None else f"at most {high}" if low is None
                  else f"between {low} and {high}" + (f" (not {high} itself)" if high_open else ""))
        raise bad(f"'{name}' must be {bounds}, got {value}", name)
    return value


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(body, *, chat: bool, defaults: SamplingParams = SamplingParams(temperature=1.0)) -> GenerationRequest:
    """The request, checked; sampling fields it leaves out come from `defaults` (the server's flags)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_text(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (GET /v1/models lists it)", "model")
    for name, (noop, accepted) in NOOP.items():
        value = body.get(name)
        if value is not None and not noop(value, body):
            raise bad(f"'{name}': {_show(value)} is not supported by dspark serve ({accepted})", name)
    n = body.get("n", 1)
    if isinstance(n, bool) or n not in (1, None):
        raise bad("'n' must be 1: dspark generates one answer per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported by dspark serve (it must be 0)", name)
    req = GenerationRequest(chat=chat, model=model)
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise bad("'prompt' must be a non-empty string (one prompt per request)", "prompt")
        req.prompt = prompt
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    req.max_tokens = None if limit is None else _number({"max_tokens": limit}, "max_tokens", None, kind=int, low=1)
    req.temperature = _number(body, "temperature", defaults.temperature, low=0.0, high=2.0)
    req.top_p = _number(body, "top_p", defaults.top_p, low=0.0, high=1.0)
    if req.top_p == 0.0:
        raise bad("'top_p' must be above 0", "top_p")
    req.top_k = _number(body, "top_k", defaults.top_k, kind=int, low=0)
    req.min_p = _number(body, "min_p", defaults.min_p, low=0.0, high=1.0, high_open=True)
    seed = body.get("seed")
    req.seed = defaults.seed if seed is None else _number(body, "seed", None, kind=int, low=0, high=2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16):
        raise bad("'stop' must be a string or a list of at most 16 strings", "stop")
    req.stop = [s for s in stop or [] if s]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    req.stream = stream
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not stream:  # as OpenAI answers it: the options say how to stream, and nothing streams
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("'stream_options.include_usage' must be true or false", "stream_options")
        req.include_usage = include_usage
    return req


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role must be system, user or assistant, got {role!r:.30}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # the parts form: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported (no images or audio)", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        out.append({"role": role, "content": content})
    return out


# ---- responses -----------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(stats: GenerationStats) -> dict:
    """OpenAI's usage; cached_tokens: GenerationStats.n_prompt_cached."""
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": stats.n_generated,
            "total_tokens": stats.n_prompt + stats.n_generated,
            "prompt_tokens_details": {"cached_tokens": stats.n_prompt_cached}}


def timings(stats: GenerationStats) -> dict:
    """llama-server's timings object, with the draft figures that show the speedup."""
    gen_ms = stats.t_generation * 1000
    return {
        "prompt_n": stats.n_prompt_evaluated, "prompt_ms": round(stats.t_prompt * 1000, 3),
        "prompt_per_second": round(stats.prompt_tokens_per_second, 3),
        "predicted_n": stats.n_generated, "predicted_ms": round(gen_ms, 3),
        "predicted_per_second": round(stats.tokens_per_second, 3),
        "draft_n": stats.n_drafted, "draft_n_accepted": stats.n_accepted,
        "draft_accepted_by": dict(stats.accepted_by),  # accepted tokens by source (engine/costs.SOURCES)
        "tokens_per_step": round(stats.tokens_per_step, 3), "method": stats.method,
        "batch_max": stats.batch_max,  # the most requests that shared one target pass with this one
        "exact": stats.exact or None,  # the proof at load: "proven (batches <= 16)", "no - ...", or the target alone
    }


def completion(req: GenerationRequest, rid: str, text: str, finish: str | None, stats: GenerationStats) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": FINISH.get(finish, finish)}
              if req.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, finish)})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": req.model, "choices": [choice], "usage": usage(stats), "timings": timings(stats)}


def chunk(req: GenerationRequest, rid: str, *, text: str | None = None, role: bool = False,
          finish: str | None = None, stats: GenerationStats | None = None) -> dict:
    """One stream chunk: the role opener, a piece of text, the closing one (finish_reason), or, with
    stream_options.include_usage, the last one with `usage` and no choices."""
    base = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": int(time.time()),
            "model": req.model}
    if stats is not None and text is None and not role and finish is None:
        return {**base, "choices": [], "usage": usage(stats), "timings": timings(stats)}
    reason = FINISH.get(finish, finish)
    if req.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {**base, "choices": [choice]}
