"""The HTTP side of a language-model server: OpenAI-compatible completions, streamed or whole.

Routes:

* ``POST /v1/completions`` and, when the tokenizer has a chat template, ``POST
  /v1/chat/completions``: OpenAI's request fields (:mod:`.openai` checks them) and answers;
  ``"stream": true`` answers with server-sent events, one ``data: {...}`` chunk per piece of text
  as the worker decodes it, then ``data: [DONE]``. Errors are OpenAI's ``{"error": {"message",
  "type", "param", "code"}}`` with a one-line message;
* ``GET /v1/models``: the one model served (its id is what requests name in ``model``);
* ``GET /health``, ``GET /metrics`` (Prometheus: TTFT and TPOT histograms, tokens by stitch),
  ``GET /stitch`` (the controller, its ladder and timings), ``PUT /stitch`` (pin a stitch or go
  back to automatic choice: the admin token, as the image server's, :mod:`.auth`).

Every request body is read under the image server's limits (:class:`.app.BodyLimits`: size and
time). The model runs in :class:`.lm_engine.LMEngine`'s worker thread; each request's events come
back to the event loop through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST

from ...errors import SnnetError, StitchNotFoundError
from .app import ADMIN_BODY_LIMIT, BodyLimits, TrackedSend, not_served
from .auth import check_admin
from .config import Listen, log
from .lm_engine import Event, Job, LMEngine, Outcome
from .openai import MAX_SEED, BadRequest, CompletionRequest, chunk, completion, error_body, new_id, parse_request
from .rejected import Rejected, count_refusal, unanswered_at_shutdown

__all__ = ["create_lm_app"]

LONG_BODY_BYTES = 64 * 1024  # a request body past this is templated and tokenised off the event loop
COMPLETIONS_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error_body(e: Rejected, openai: bool) -> dict[str, Any]:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return error_body(e.reason, getattr(e, "param", None), kind) if openai else {"error": e.reason}


def _error(e: Rejected, engine: LMEngine, openai: bool = True) -> Response:
    """A refusal: OpenAI's error shape on /v1 routes, the image server's ``{"error": ...}`` elsewhere."""
    count_refusal(e, engine.metrics)
    return _json(_error_body(e, openai), e.status, e.headers)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class _Request:
    """One completion request on its way: the checked fields, the job in the queue, its events."""

    def __init__(self, engine: LMEngine, req: CompletionRequest, job: Job, events: asyncio.Queue[Event]) -> None:
        self.engine, self.req, self.job, self.events = engine, req, job, events
        self.id, self.created = new_id(req.chat), int(time.time())
        self.model = engine.config.served_name

    async def _watch(self, receive: Any) -> None:
        """Wait for the client to go (its body is read: the next message is ``http.disconnect``), then drop
        its job (waiting: out of the queue; running: stopped at the next token) and end the wait for events."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(self.job)
        self.events.put_nowait(("gone", None))

    async def whole(self, receive: Any) -> Response:
        parts: list[str] = []
        watch = asyncio.create_task(self._watch(receive))
        try:
            while True:
                try:
                    kind, value = await self.events.get()
                except asyncio.CancelledError as e:  # uvicorn's graceful shutdown ended before the model did
                    refusal = unanswered_at_shutdown(e, f"completion {self.id}", log)
                    if refusal is None:
                        raise
                    return _error(refusal, self.engine)
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    return _error(Rejected(500, value, "model_error"), self.engine)
                elif kind == "stopped":
                    return _error(Rejected(503, value, "stopped"), self.engine)
                elif kind == "gone":  # nobody to answer
                    return Response(status_code=499)
                elif kind == "done":
                    out: Outcome = value
                    break
        finally:
            watch.cancel()
            self.engine.cancel(self.job)  # a client gone before the end: the worker stops at the next token
        self.engine.metrics.requests.labels("200").inc()
        return _json(completion(self.id, self.req.chat, self.model, "".join(parts), out.finish, out.usage(), out.snnet()),
                     headers={"x-snnet-stitch": str(out.stitch), "x-snnet-stitch-name": out.name})

    async def stream(self) -> AsyncIterator[bytes]:
        c, chat = self.req, self.req.chat
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "start" and chat:
                    yield _sse(chunk(self.id, chat, self.model, self.created, "", role=True))
                elif kind == "text":
                    yield _sse(chunk(self.id, chat, self.model, self.created, value))
                elif kind in ("error", "stopped"):
                    yield _sse(error_body(value, kind="server_error"))
                    yield b"data: [DONE]\n\n"
                    return
                elif kind == "done":
                    out: Outcome = value
                    yield _sse(chunk(self.id, chat, self.model, self.created, None if chat else "", out.finish, snnet=out.snnet()))
                    if c.include_usage:
                        yield _sse(chunk(self.id, chat, self.model, self.created, None, usage=out.usage()))
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            self.engine.cancel(self.job)


class _Streamed(StreamingResponse):
    """A streamed completion: :meth:`_Request.stream`'s server-sent events. One the model had not finished when the
    server's graceful shutdown (--timeout-graceful-shutdown) ran out was uvicorn's cancellation: a traceback in the
    log and the connection cut mid-stream, which OpenAI's clients report as a broken connection. Its status (200) is
    sent by then, so it ends as a stream the model failed on does: an error event saying why, then ``[DONE]``, and
    one line in the log."""

    def __init__(self, run: _Request) -> None:
        super().__init__(run.stream(), media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.run = run

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        tracked = TrackedSend(send)
        try:
            await super().__call__(scope, receive, tracked)
        except asyncio.CancelledError as e:  # uvicorn's, here: the events were read in a task of Starlette's, cancelled with it
            refusal = unanswered_at_shutdown(e, f"completion {self.run.id} (streamed)", log,
                                             "its stream ended with an error event" if tracked.started else "answered 503")
            if refusal is None:
                raise
            if not tracked.started:  # cancelled before its first event: a status can still say it
                return await _json(_error_body(refusal, True), refusal.status, refusal.headers)(scope, receive, send)
            end = _sse(error_body(refusal.reason, kind="server_error")) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": end, "more_body": False})


def _tokens(engine: LMEngine, req: CompletionRequest) -> tuple[str, int]:
    """The text generation continues and its number of tokens."""
    prompt = _prompt(engine, req)
    return prompt, engine.count_tokens(prompt)


def _prompt(engine: LMEngine, req: CompletionRequest) -> str:
    """The text generation continues: the prompt, or the messages through the tokenizer's chat template."""
    if not req.chat:
        return req.prompt or ""
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template: send the text to /v1/completions instead", "messages")
    try:
        text = tok.apply_chat_template([{"role": r, "content": t} for r, t in req.messages], tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 -- a template may refuse a conversation (say, a system turn)
        raise BadRequest(f"the chat template refused these messages ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         "messages") from e
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds it again when generation reads the prompt
    return text


async def _complete(engine: LMEngine, request: Request, chat: bool) -> Response:
    from ...generate import GenerationOptions

    arrived = time.perf_counter()
    try:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"the body is not JSON ({str(e).splitlines()[0]}): send a JSON object with `model` and "
                             f"`{'messages' if chat else 'prompt'}`") from e
        req = parse_request(body, chat)
        name = engine.config.served_name
        if req.model != name:
            raise Rejected(404, f"model {req.model!r} is not served here; this server serves {name!r} (GET /v1/models)",
                           "model_not_found")
        # a long body's template and tokenisation (up to the body limit) in a thread: the event loop keeps answering
        # meanwhile; a short one here, where the thread's hand-off would cost more than it saves
        prompt, n = await asyncio.to_thread(_tokens, engine, req) if len(raw) > LONG_BODY_BYTES else _tokens(engine, req)
        if n == 0:
            raise BadRequest("the prompt is empty after tokenisation: give at least one token of text", "prompt")
        context = engine.context
        limit = req.max_tokens if req.max_tokens is not None else (context - n if chat else COMPLETIONS_DEFAULT_TOKENS)
        if limit < 1:  # chat's default, the rest of the context, is nothing: no max_tokens was asked for to lower
            raise BadRequest(f"the prompt has {n} tokens: this model's context of {context} tokens leaves none to generate; "
                             "shorten the messages", "messages")
        if n + limit > context:
            raise BadRequest(f"the prompt has {n} tokens and max_tokens asks for {limit}: more than this model's context of "
                             f"{context} tokens; shorten the prompt or lower max_tokens",
                             "max_tokens" if req.max_tokens is not None and n < context else "prompt")
        seed = req.seed if req.seed is not None or req.temperature == 0 else secrets.randbelow(MAX_SEED)  # unseeded: a fresh sample
        options = GenerationOptions(max_new_tokens=limit, temperature=req.temperature, top_p=req.top_p, stop=req.stop, seed=seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        job = Job(prompt, n, options, arrived, emit)
        engine.submit(job)
    except Rejected as e:
        return _error(e, engine)
    run = _Request(engine, req, job, events)
    if not req.stream:
        return await run.whole(request.receive)
    engine.metrics.requests.labels("200").inc()
    return _Streamed(run)


async def _put_stitch(engine: LMEngine, request: Request) -> Response:
    usage = 'send JSON {"stitch": <id or name>} to pin one, or {"stitch": "auto"} for automatic choice'
    try:
        check_admin(engine.admin_token, request.headers.get("authorization"))
        raw = await request.body()  # at most ADMIN_BODY_LIMIT bytes (BodyLimits)
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as e:
            raise Rejected(400, f"the body is not JSON ({type(e).__name__}): {usage}", "bad_request") from e
        key = body.get("stitch") if isinstance(body, dict) else None
        if not isinstance(key, (int, str)) or isinstance(key, bool) or set(body) - {"stitch"}:
            raise Rejected(400, usage, "bad_request")
        try:
            state = engine.auto() if key == "auto" else engine.pin(key)
        except StitchNotFoundError as e:
            raise Rejected(404, str(e).splitlines()[0], "unknown_stitch") from e
        except SnnetError as e:
            raise Rejected(400, str(e).splitlines()[0], "bad_request") from e
    except Rejected as e:
        return _error(e, engine, openai=False)
    log.info("stitch %s", "automatic" if key == "auto" else f"pinned to {state['pinned']['name']}")
    return _json(state)


def create_lm_app(engine: LMEngine, *, graceful_shutdown_s: float = Listen.timeout_graceful_shutdown) -> FastAPI:
    """The FastAPI app serving ``engine`` (see the module): the worker starts with the server, and
    stops with it after the requests in flight (uvicorn's graceful shutdown) are answered, waiting
    ``graceful_shutdown_s`` at most (the server's --timeout-graceful-shutdown, as :func:`.app.create_app`)."""
    config = engine.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        s = engine.state()
        targets = [f"{what} target {v:g} ms" for what, v in (("TTFT", config.slo_ms), ("TPOT", config.tpot_ms)) if v is not None]
        log.info("serving %s as %r: %d stitches, %d on the ladder (%s ... %s), %s, %s", config.model, config.served_name,
                 len(engine.net.stitches), len(s["ladder"]), s["ladder"][0]["name"], s["ladder"][-1]["name"],
                 ", ".join(targets) or "no latency target", f"pinned to {s['pinned']['name']}" if s["pinned"] else "automatic")
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, graceful_shutdown_s)

    docs = config.docs
    app = FastAPI(title="snnet serve (language model)", summary="OpenAI-compatible completions from one stitchable LM",
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await _complete(engine, request, chat=False)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await _complete(engine, request, chat=True)

    @app.get("/v1/models")
    async def _models() -> Response:
        return _json({"object": "list", "data": [{"id": config.served_name, "object": "model", "created": 0, "owned_by": "snnet",
                                                  "context": engine.context, "stitches": len(engine.net.stitches),
                                                  "chat": bool(getattr(engine.tokenizer, "chat_template", None))}]})

    @app.get("/health")
    async def _health() -> Response:
        s = engine.state()
        body = {"status": "ok" if engine.alive else "down", "model": config.served_name, "mode": s["mode"],
                "stitch": s["pinned"] or s["current"], "queue": s["queue"], "running": s["running"],
                "generations": s["generations"]}
        return _json(body, 200 if engine.alive else 503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stitch")
    async def _get_stitch() -> Response:
        return _json(engine.state())

    @app.put("/stitch")
    async def _stitch(request: Request) -> Response:
        """Pin a stitch or go back to automatic choice (needs `Authorization: Bearer <admin token>`)."""
        return await _put_stitch(engine, request)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, e: Rejected) -> Response:  # raised while a body is read (413)
        return _error(e, engine, openai=request.url.path.startswith("/v1/"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Response:  # Starlette's own 404, 405: the server's error shapes
        refusal = Rejected(e.status_code, not_served(request, e), "not_found")
        return _json(_error_body(refusal, request.url.path.startswith("/v1/")), e.status_code, e.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> Response:  # the client left mid-body: nobody to answer,
        return Response(status_code=400)  # and nothing broken (not an "Exception in ASGI application" traceback in the log)

    def limit(method: str, path: str) -> int:
        return config.max_upload_bytes if path.startswith("/v1/") else ADMIN_BODY_LIMIT

    # the refusals the middleware answers itself (413 by Content-Length, 408) counted like the app's, and in its shapes
    app.add_middleware(BodyLimits, limit=limit, timeout_s=config.body_timeout_s, refused=lambda e: count_refusal(e, engine.metrics),
                       error=lambda path, e: _error_body(e, path.startswith("/v1/")))
    return app
