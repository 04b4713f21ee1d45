"""The routes: POST /v1/chat/completions and /v1/completions (JSON, or Server-Sent Events with stream: true),
GET /v1/models, GET /v1/models/{id}, GET /health. Every failure answers in OpenAI's error format (unknown
paths and methods too), the server goes on serving, and stderr gets one line per request, never a traceback."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..console import say
from ..errors import ContextFullError, DsparkError, PromptError, UsageError
from ..engine.sampling import SamplingParams
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
    read_timeout: float | None = 30.0  # seconds a request's body may pause (408 beyond); None: no limit


# Long: the routes are closures over the pair, the options and the worker; each route is short.


def create_app(pair, options: ServeOptions, worker: Worker) -> Starlette:
    """An ASGI app serving `pair` (a dspark_cli.api.Pair)."""

    def card() -> dict:
        return {"id": options.model_id, "object": "model", "created": int(time.time()), "owned_by": "dspark",
                "meta": {"target": str(pair.target_path), "draft": str(pair.draft_path) if pair.draft_path else None,
                         "method": pair.method, "n_ctx": pair.target.n_ctx, "parallel": pair.parallel,
                         "exact": pair.exact_label, "exactness": pair.exactness.as_dict() if pair.exactness else None}}

    async def health(request: Request) -> Response:
        meter = worker.meter
        return JSONResponse({
            "status": "ok", "model": options.model_id, "generating": worker.busy, "active": worker.active,
            "slots": worker.slots, "waiting": worker.waiting, "settling": pair.settling,
            "tokens_per_second": round(meter.tokens_per_second(), 2),
            "requests": [{"tokens": st.n_generated, "acceptance": round(st.acceptance_rate, 4) if st.n_drafted else None,
                          "tokens_per_second": round(st.tokens_per_second, 2)} for st in list(meter.live.values())]})

    async def metrics(request: Request) -> Response:
        """Prometheus' text format: the same figures as /health, plus counters."""
        meter = worker.meter
        live = list(meter.live.values())
        drafted = sum(st.n_drafted for st in live)
        lines = [
            "# HELP dspark_requests_active Requests holding a slot (generating).", "# TYPE dspark_requests_active gauge",
            f"dspark_requests_active {worker.active}",
            "# HELP dspark_requests_waiting Requests waiting for a slot.", "# TYPE dspark_requests_waiting gauge",
            f"dspark_requests_waiting {worker.waiting}",
            "# HELP dspark_slots Generations the server runs at once (--parallel).", "# TYPE dspark_slots gauge",
            f"dspark_slots {worker.slots}",
            "# HELP dspark_tokens_per_second Tokens delivered per second, all requests, last 10 s.",
            "# TYPE dspark_tokens_per_second gauge", f"dspark_tokens_per_second {meter.tokens_per_second():.3f}",
            "# HELP dspark_tokens_total Tokens delivered since start.", "# TYPE dspark_tokens_total counter",
            f"dspark_tokens_total {meter.tokens}",
            "# HELP dspark_requests_total Generations started since start.", "# TYPE dspark_requests_total counter",
            f"dspark_requests_total {meter.requests}",
            "# HELP dspark_prompt_tokens_total Prompt tokens of the generations started.",
            "# TYPE dspark_prompt_tokens_total counter", f"dspark_prompt_tokens_total {meter.prompt_tokens}",
            "# HELP dspark_prompt_tokens_cached_total Prompt tokens not processed: a cache held them (the slot's own, "
            "or another slot's copied over).", "# TYPE dspark_prompt_tokens_cached_total counter",
            f"dspark_prompt_tokens_cached_total {meter.prompt_cached}",
            "# HELP dspark_acceptance_active Drafted tokens accepted, over the requests under way.",
            "# TYPE dspark_acceptance_active gauge",
            f"dspark_acceptance_active {sum(st.n_accepted for st in live) / drafted if drafted else 0.0:.4f}",
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        _authorize(request, options)
        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request: Request) -> Response:
        _authorize(request, options)
        name = request.path_params["name"]
        if name != options.model_id:
            raise _no_such_model(name, options)
        return JSONResponse(card())

    async def generate(request: Request, chat: bool) -> Response:
        _authorize(request, options)
        body = await _json(request, options.max_body, options.read_timeout)
        req = schemas.parse(body, chat=chat, defaults=options.defaults)
        if req.model != options.model_id:
            raise _no_such_model(req.model, options)
        gone = asyncio.ensure_future(_disconnected(request))  # the body is read: a disconnect is all that can come
        try:
            await _unless_gone(worker.acquire(), gone)  # a client that leaves while queued is never served
        except BaseException:
            gone.cancel()
            raise
        events = worker.events(lambda: _start(pair, req, options))
        streaming = False
        try:
            if req.stream:
                # The generation starts (prompt tokenized, its length checked, the first event out) before the
                # 200: a failure there is the same 4xx as without streaming, not an error event after a 200.
                first = await _unless_gone(events.__anext__(), gone)
                gone.cancel()  # from here StreamingResponse watches for the client going away

                async def finish() -> None:
                    await events.aclose()
                    worker.release()

                streaming = True
                return _Stream(_sse(req, first, events, request), finish, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(await _whole(req, events, gone, request))
        finally:
            gone.cancel()
            if not streaming:
                await events.aclose()
                worker.release()

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404 (no such path) and 405 (a method the path does not take), in OpenAI's format."""
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            err = ApiError(404, f"Invalid URL ({where}): dspark serve has POST /v1/chat/completions, POST "
                           "/v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health and GET /metrics", code="unknown_url")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}; it takes {allowed}",
                           code="method_not_allowed", headers=exc.headers)
        else:
            err = ApiError(exc.status_code, f"{where}: {exc.detail}", headers=exc.headers)
        return _error_response(err)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error})
    app.add_middleware(_ErrorsAndLog)
    return app


def _no_such_model(name: str, options: ServeOptions) -> ApiError:
    return ApiError(404, f"the model '{name}' does not exist; this server has '{options.model_id}'",
                    param="model", code="model_not_found")


def _key_bytes(key: str) -> bytes:
    """The key as the bytes a client sends: UTF-8 (undecodable bytes of the command line as they were)."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")


def _authorize(request: Request, options: ServeOptions) -> None:
    """Bytes against bytes: the header as it came (any bytes at all) against the key in UTF-8, in constant time."""
    if options.api_key is None:
        return
    given = next((value for name, value in request.scope["headers"] if name.lower() == b"authorization"), b"")
    scheme, _, token = given.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), _key_bytes(options.api_key)):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="invalid_request_error",
                       code="invalid_api_key")


async def _json(request: Request, limit: int, timeout: float | None = None):
    """The request's body as JSON: a 413 past `limit` bytes, a 408 when it pauses for `timeout` seconds (a client
    that declares more than it sends would otherwise hold its connection forever), a 499 when the client leaves
    halfway (its fault, not the server's: no 500 in the log)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = b""
    parts = request.stream().__aiter__()
    while True:
        try:
            part = await asyncio.wait_for(parts.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body stopped arriving ({timeout:g} s without a byte)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise _client_gone() from None
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None


def _start(pair, req: GenerationRequest, options: ServeOptions):
    """The generation's events (in the worker thread). A string prompt for /v1/completions is sent raw, as
    OpenAI's completions endpoint does; chat messages go through the model's chat template."""
    prompt = req.messages if req.chat else req.prompt
    return pair.generate(prompt, raw=not req.chat, max_tokens=req.max_tokens or options.max_tokens,
                         temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                         seed=req.seed, stop=req.stop, draft_max=options.draft_max, fixed=options.fixed)


def _client_gone() -> ApiError:
    """What a request whose client went away ends in: only the log ever shows it."""
    return ApiError(499, "the client closed the connection", code="client_closed")


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        queue = f"{e.waiting} requests are waiting" if e.waiting else "every slot is in use and --max-queue is 0"
        return ApiError(429, f"the server is busy: {queue}; retry shortly",
                        kind="rate_limit_error", code="busy", headers={"Retry-After": "2"})
    if isinstance(e, ContextFullError):
        return ApiError(400, e.message, code="context_length_exceeded")
    if isinstance(e, (PromptError, UsageError)):
        return ApiError(400, e.message)
    if isinstance(e, Stopped):
        return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if isinstance(e, DsparkError):
        return ApiError(500, e.message, kind="server_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def _error_response(err: ApiError) -> Response:
    """The error object as ASCII JSON: whatever text it quotes, it can be sent."""
    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers, media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. Only once the body has been read: ASGI's receive() then has nothing
    left to give but http.disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a server that cannot tell counts as a client gone
        return


async def _unless_gone(awaitable, gone: asyncio.Future):
    """The result of `awaitable`, or a 499 once the client has gone away first: the awaitable (a generation's
    events) is then cancelled, which stops the generation at its next token and waits until the models are free.
    A failure of the generation is its HTTP error."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _client_gone()
    try:
        return task.result()
    except StopAsyncIteration:
        raise ApiError(500, "the generation ended without an event", kind="server_error") from None
    except Exception as e:  # noqa: BLE001 - answered as OpenAI's error object
        raise _as_api_error(e) from None


class _Stream(StreamingResponse):
    """A stream that, however it ends (done, the client gone, never started), runs `finish` once."""

    def __init__(self, content, finish, **kwargs):
        super().__init__(content, **kwargs)
        self._finish = finish

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._finish()


async def _whole(req: GenerationRequest, events, gone: asyncio.Future, request: Request) -> dict:
    """The whole answer; a client that goes away meanwhile stops the generation (logged as 499)."""
    rid = schemas.new_id(req.chat)
    pieces, last = [], None

    async def collect() -> None:
        nonlocal last
        async for ev in events:
            pieces.append(ev.text)
            last = ev

    try:
        await _unless_gone(collect(), gone)
    finally:
        if last is not None:
            request.state.stats = last.stats
    if last is None:
        raise ApiError(500, "the generation ended without an event", kind="server_error")
    return schemas.completion(req, rid, "".join(pieces), last.finish_reason, last.stats)


async def _sse(req: GenerationRequest, first, events, request: Request):
    """The stream, from the generation's first event: a role opener (chat), the text as it comes, the closing
    chunk with finish_reason, usage when asked, then [DONE]. A failure mid-stream (shutdown, an error) ends it
    with an error object and [DONE]."""
    rid = schemas.new_id(req.chat)

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    last, cut = first, "the client left mid-stream"  # unless it ends below (the 200 was sent before)
    try:
        if req.chat:
            yield sse(schemas.chunk(req, rid, role=True))
        if first.text:
            yield sse(schemas.chunk(req, rid, text=first.text))
        try:
            async for ev in events:
                last = ev
                if ev.text:
                    yield sse(schemas.chunk(req, rid, text=ev.text))
        except Exception as e:  # noqa: BLE001 - the answer is under way: its error goes in the stream
            err = _as_api_error(e)
            cut = f"ended early: {err.code or err.kind}"
            yield sse(err.body())
            yield b"data: [DONE]\n\n"
            return
        yield sse(schemas.chunk(req, rid, finish=last.finish_reason))
        if req.include_usage:
            yield sse(schemas.chunk(req, rid, stats=last.stats))
        yield b"data: [DONE]\n\n"
        cut = None
    finally:  # the log line's figures, and how the stream was cut short, if it was
        request.state.stats = last.stats
        request.state.cut = cut


class _ErrorsAndLog:
    """Every ApiError (and any other failure) as OpenAI's error object, and one log line per request on stderr:
    method, path, status, tokens, tok/s, acceptance."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - one answer per failure, never a traceback to the client
            err = _as_api_error(e)
            if not status["sent"]:  # (once an answer is under way, nothing more can be said on it)
                status["code"] = err.status
                try:
                    await _error_response(err)(scope, receive, send)
                except Exception:  # noqa: BLE001 - the client is gone
                    pass
        finally:
            line = f"{scope['method']} {scope['path']} {status['code']} · {time.perf_counter() - started:.2f}s"
            stats = state.get("stats")
            if stats is not None:
                line += f" · {stats.n_generated} tokens · {stats.tokens_per_second:.1f} tok/s"
                if stats.n_drafted:
                    line += f" · acceptance {stats.acceptance_rate:.0%}"
            if state.get("cut"):
                line += f" · {state['cut']}"
            say(line)
