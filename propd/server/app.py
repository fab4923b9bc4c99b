"""``propd serve``: an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching scheduler.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as server-sent
events in OpenAI's chunk format), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Bad
requests get OpenAI-style error bodies and a 4xx; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from propd.decoding.loop import Method
from propd.decoding.sampling import Sampling
from propd.engine import Propd, TextStream, remember
from propd.errors import PropdError
from propd.server.metrics import Metrics
from propd.server.scheduler import QueueFull, Scheduler, Ticket

DISCONNECT_POLL_S = 1.0


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Common(BaseModel):
    """Fields both endpoints share. Temperature 0 is greedy; absent, the server's --temperature."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    n: int = Field(1, ge=1)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: str | list[str]
    echo: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StopText:
    """Cuts text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        text = self.pending + piece
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


class CountRequests:
    """Counts every HTTP request by its route and status (a plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` hid a client's going away from ``Request.is_disconnected``, and errors
    from the count). Paths that match no route count as "other": scanners grow no new series."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()


def create_app(model: Propd, method: Method, method_name: str, model_name: str, max_batch_size: int = 8, max_queue: int = 64,
               default_max_tokens: int = 256, default_sampling: Sampling | None = None, acceptance: str = "exact") -> FastAPI:
    """The app; requests that send no temperature sample by ``default_sampling`` (None: greedy; its
    seed None: each request that sends none draws its own); sampled requests accept tree tokens by
    ``acceptance`` (exact or typical)."""
    metrics = Metrics(max_depth=max(1, method.tree_depth))
    scheduler = Scheduler(model, method, metrics, max_batch_size, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()
        remember(method)

    app = FastAPI(title="propd", lifespan=lifespan)
    app.state.scheduler = scheduler

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"), status_code=400)
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg')}", param=where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "method": method_name, "running": len(scheduler.loop.rows),
                "waiting": len(scheduler.waiting) + scheduler.loop.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "propd"}]}

    def sampling(body: Common) -> Sampling | None:
        """The request's sampling: its fields over the server's defaults; None for greedy."""
        base = default_sampling or Sampling()
        temperature = body.temperature if body.temperature is not None else (default_sampling.temperature if default_sampling else 0)
        if temperature == 0:
            return None
        top_p = body.top_p if body.top_p is not None else base.top_p
        top_k = body.top_k if body.top_k is not None else base.top_k
        seed = body.seed if body.seed is not None else base.seed
        try:
            return Sampling(temperature, top_p, top_k, seed, acceptance)
        except PropdError as e:
            raise ApiError(400, str(e)) from None

    def check(body: Common, prompt_ids: list[int], max_tokens: int | None) -> int:
        """Refuse what propd cannot do or what does not fit; the request's token limit."""
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} not found; this server has {model_name!r}", "model", "model_not_found")
        if body.n != 1:
            raise ApiError(400, "n must be 1", "n")
        room = model.max_context - len(prompt_ids) - method.tree_depth
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {model.max_context}",
                           "messages", "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the context of {model.max_context}",
                           "max_tokens", "context_length_exceeded")
        return max_tokens or min(default_max_tokens, room)

    def encode(prompt: str | list[dict], chat: bool, param: str) -> list[int]:
        try:
            return model.encode(prompt, chat)
        except PropdError as e:
            raise ApiError(400, str(e), param) from None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        ids = encode([m.model_dump() for m in body.messages], True, "messages")
        limit = check(body, ids, body.max_completion_tokens or body.max_tokens)
        return await respond(request, body, ids, limit, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", "prompt")
        if body.echo:
            raise ApiError(400, "echo is not supported", "echo")
        ids = encode(prompts[0], False, "prompt")
        limit = check(body, ids, body.max_tokens)
        return await respond(request, body, ids, limit, "text_completion")

    async def respond(request: Request, body: Common, ids: list[int], limit: int, kind: str):
        try:
            ticket = scheduler.submit(ids, limit, sampling(body))
        except QueueFull as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error") from None
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        pieces = generate_text(request, ticket, StopText(stops))
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(rid, kind, pieces, ticket, usage), media_type="text/event-stream")
        text = []
        try:
            async for piece in pieces:
                text.append(piece)
        except PropdError as e:
            raise ApiError(500, str(e), kind="server_error") from None
        return completion(rid, kind, "".join(text), ticket)

    async def generate_text(request: Request, ticket: Ticket, stop: StopText) -> AsyncIterator[str]:
        """The request's text as it is decoded; cancels its row when the client goes or a stop string ends it."""
        stream = TextStream(model.tokenizer)
        checked = time.monotonic()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(ticket.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens flow: a client that waits for the whole answer
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is None:
                    continue
                if isinstance(item, Exception):
                    raise item if isinstance(item, PropdError) else PropdError(f"decoding failed: {item}")
                tokens, done = item
                piece = stop.push(stream.push(tokens) + (stream.finish() if done else ""))
                if piece:
                    yield piece
                if stop.stopped:
                    ticket.stopped = True
                    return
                if done:
                    if rest := stop.finish():
                        yield rest
                    return
        finally:
            scheduler.cancel(ticket)

    def usage(ticket: Ticket) -> dict:
        n = len(ticket.row.stats.token_ids) if ticket.row else 0
        return {"prompt_tokens": len(ticket.prompt_ids), "completion_tokens": n, "total_tokens": len(ticket.prompt_ids) + n}

    def finish_reason(ticket: Ticket) -> str:
        return "stop" if ticket.stopped or ticket.row is None else ticket.row.finish_reason

    def completion(rid: str, kind: str, text: str, ticket: Ticket) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason(ticket)}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice], "usage": usage(ticket)}

    async def sse(rid: str, kind: str, pieces: AsyncIterator[str], ticket: Ticket, include_usage: bool) -> AsyncIterator[str]:
        chat_kind = kind == "chat.completion"
        created = int(time.time())

        def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat_kind:
                d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = {"id": rid, "object": "chat.completion.chunk" if chat_kind else "text_completion", "created": created,
                   "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat_kind:
                yield chunk(None, first=True)
            async for piece in pieces:
                yield chunk(piece)
            yield chunk(None, finish_reason(ticket))
            if include_usage:
                obj = {"id": rid, "object": "chat.completion.chunk" if chat_kind else "text_completion", "created": created,
                       "model": model_name, "choices": [], "usage": usage(ticket)}
                yield f"data: {json.dumps(obj)}\n\n"
        except PropdError as e:
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
        finally:
            scheduler.cancel(ticket)  # the client may have gone: free its row
        yield "data: [DONE]\n\n"

    return app
