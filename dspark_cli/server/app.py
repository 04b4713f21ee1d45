"""The routes: POST /v1/chat/completions and /v1/completions (JSON, or Server-Sent Events with stream: true),
GET /v1/models, GET /health. Every failure answers in OpenAI's error format, the server goes on serving."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..console import say
from ..errors import DsparkError, PromptError, UsageError
from ..sampling import SamplingParams
from . import schemas
from .schemas import ApiError, GenerationRequest
from .worker import Busy, Stopped, Worker


@dataclass
class ServeOptions:
    model_id: str  # the name clients put in "model" (GET /v1/models)
    api_key: str | None = None  # required as "Authorization: Bearer" by every endpoint but /health
    max_body: int = 8 << 20  # bytes
    max_tokens: int = 2048  # when a request does not say
    draft_max: int = 8
    fixed: bool = False
    defaults: SamplingParams = SamplingParams()  # for requests that leave a sampling field out (seed None: random)


def create_app(pair, options: ServeOptions, worker: Worker) -> Starlette:
    """An ASGI app serving `pair` (a dspark_cli.api.Pair)."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": options.model_id, "waiting": worker.waiting})

    async def models(request: Request) -> Response:
        _authorize(request, options)
        return JSONResponse({"object": "list", "data": [
            {"id": options.model_id, "object": "model", "created": int(time.time()), "owned_by": "dspark",
             "meta": {"target": str(pair.target_path), "draft": str(pair.draft_path) if pair.draft_path else None,
                      "method": pair.method, "n_ctx": pair.target.n_ctx}}]})

    async def generate(request: Request, chat: bool) -> Response:
        _authorize(request, options)
        req = schemas.parse(await _json(request, options.max_body), chat=chat, defaults=options.defaults)
        if req.model != options.model_id:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server has '{options.model_id}'",
                           param="model", code="model_not_found")
        try:
            await worker.acquire()
        except Busy:
            raise ApiError(429, f"the server is busy: {worker.waiting} requests are waiting; retry shortly",
                           kind="rate_limit_error", code="busy", headers={"Retry-After": "2"}) from None
        try:
            events = worker.events(lambda: _start(pair, req, options))
            if req.stream:
                return StreamingResponse(_sse(req, events, worker, request), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                return JSONResponse(await _whole(req, events, request))
            finally:
                worker.release()
        except BaseException:
            if not req.stream:
                raise
            worker.release()
            raise

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ])
    app.add_middleware(_ErrorsAndLog)
    return app


def _authorize(request: Request, options: ServeOptions) -> None:
    if options.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), options.api_key):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="invalid_request_error",
                       code="invalid_api_key")


async def _json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _start(pair, req: GenerationRequest, options: ServeOptions):
    """The generation's events (in the worker thread). A string prompt for /v1/completions is sent raw, as
    OpenAI's completions endpoint does; chat messages go through the model's chat template."""
    prompt = req.messages if req.chat else req.prompt
    return pair.generate(prompt, raw=not req.chat, max_tokens=req.max_tokens or options.max_tokens,
                         temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                         seed=req.seed, stop=req.stop, draft_max=options.draft_max, fixed=options.fixed)


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (PromptError, UsageError)):
        return ApiError(400, e.message)
    if isinstance(e, Stopped):
        return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if isinstance(e, DsparkError):
        return ApiError(500, e.message, kind="server_error")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")


async def _whole(req: GenerationRequest, events, request: Request) -> dict:
    rid = schemas.new_id(req.chat)
    pieces, last = [], None
    try:
        async for ev in events:
            pieces.append(ev.text)
            last = ev
    except BaseException as e:
        raise _as_api_error(e) from None
    finally:
        await events.aclose()
    request.state.stats = last.stats
    return schemas.completion(req, rid, "".join(pieces), last.finish_reason, last.stats)


async def _sse(req: GenerationRequest, events, worker: Worker, request: Request):
    """The stream: a role opener (chat), the text as it comes, the closing chunk with finish_reason, usage when
    asked, then [DONE]. A failure mid-stream (shutdown, an error) ends it with an error object and [DONE]."""
    rid = schemas.new_id(req.chat)

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    try:
        if req.chat:
            yield sse(schemas.chunk(req, rid, role=True))
        last = None
        try:
            async for ev in events:
                last = ev
                if ev.text:
                    yield sse(schemas.chunk(req, rid, text=ev.text))
        except BaseException as e:
            if not isinstance(e, Exception):
                raise  # the client went away (the task is cancelled): nobody to tell
            yield sse(_as_api_error(e).body())
            yield b"data: [DONE]\n\n"
            return
        request.state.stats = last.stats
        yield sse(schemas.chunk(req, rid, finish=last.finish_reason))
        if req.include_usage:
            yield sse(schemas.chunk(req, rid, stats=last.stats))
        yield b"data: [DONE]\n\n"
    finally:
        await events.aclose()
        worker.release()


class _ErrorsAndLog:
    """Every ApiError (and any other failure) as OpenAI's error object, and one log line per request on stderr:
    method, path, status, tokens, tok/s, acceptance."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - one answer per failure, never a traceback to the client
            err = _as_api_error(e)
            status["code"] = err.status
            response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
            await response(scope, receive, send)
        finally:
            line = f"{scope['method']} {scope['path']} {status['code']} · {time.perf_counter() - started:.2f}s"
            stats = state.get("stats")
            if stats is not None:
                line += f" · {stats.n_generated} tokens · {stats.tokens_per_second:.1f} tok/s"
                if stats.n_drafted:
                    line += f" · acceptance {stats.acceptance_rate:.0%}"
            say(line)
