"""The HTTP side: the FastAPI app, its routes, and the limits every request body is read under.

Routes (the handlers are plain functions of the :class:`~.service.Service` and the request, so
the Ray Serve deployment (:mod:`snnet.deploy.ray`) serves the very same ones):

* ``POST /predict`` — a PNG/JPEG as the body; a multipart form with one file part named ``file``
  per image (several: a batch, answered together in order); or a raw tensor (``.npy`` or
  safetensors body). Answers JSON, or ``.npy`` probabilities when the client asks for
  ``Accept: application/x-npy``;
* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /stitch`` (the policy and ladder);
* ``PUT /stitch`` — pin a stitch or go back to automatic choice: needs the admin token (:mod:`.auth`).

:class:`BodyLimits` (ASGI middleware) reads every request body under two limits: its size (a
413 the client can read: the rest of an oversized body is read and dropped, so the client is not
reset while it is still sending) and the time it may take to arrive (``--body-timeout``: then 408
and the connection is closed). A request holds no room in the queue until its whole body is here.
``/docs``, ``/redoc`` and ``/openapi.json`` are off unless ``docs`` is set.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, MultipartState, parse_options_header

from ...errors import ServeError
from ..heap import freeze_heap
from .auth import check_admin
from .batcher import BatchResult
from .config import ENV_CONFIG, POLICIES, Listen, ServeConfig, log
from .images import ARRAY_TYPES, first_line, read_array
from .metrics import Metrics
from .rejected import Rejected, count_refusal, refused_at_shutdown
from .service import Service
from .upstream import ARRIVED, KEY, release

__all__ = ["ADMIN_BODY_LIMIT", "BodyLimits", "ENV_ENGINE", "ENV_GRACEFUL", "Fleet", "app_from_env", "create_app", "get_stitch",
           "health", "metrics", "predict", "put_stitch"]

ENV_ENGINE = "SNNET_SERVE_ENGINE"  # "<socket path> <authkey hex>": the model process uvicorn's workers join
ENV_GRACEFUL = "SNNET_SERVE_GRACEFUL_S"  # --timeout-graceful-shutdown, for uvicorn's workers (create_app's graceful_shutdown_s)
ADMIN_BODY_LIMIT = 4096  # bytes of a PUT /stitch body: {"stitch": <name>} needs a few dozen
NPY = "application/x-npy"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Fleet(Protocol):
    """Replicas that follow one stitch policy (:mod:`snnet.deploy.ray`): a server that is one of
    several applies the shared setting at start and follows it, publishes a PUT /stitch to the
    others, and reports /metrics for all of them."""

    name: str  # this replica's, in /health, GET /stitch and the `replica` label of /metrics

    async def start(self, svc: Service) -> None: ...

    async def steer(self, svc: Service, setting: dict[str, Any]) -> dict[str, Any]:
        """Apply ``setting`` here (:func:`apply_setting`, its answer returned), then publish it to the others."""
        ...

    async def metrics(self, svc: Service) -> bytes: ...

    async def stop(self) -> None: ...


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type="application/json")


def _reject(e: Rejected, metrics: Metrics) -> Response:
    count_refusal(e, metrics)
    return _json({"error": e.reason}, e.status, e.headers)


# =============================================================================== start-up


class OneLineStartFailure:
    """ASGI middleware: a start that fails with a :class:`ServeError` is reported in its one line. Starlette sends a
    failed lifespan's whole traceback as the reason (``lifespan.startup.failed``), which uvicorn logs as the error: a
    worker of `snnet serve --workers N` that could not join a model process that hangs logged thirty lines of
    Starlette's and asyncio's frames around the sentence that says what happened and what to do."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        held: list[dict[str, Any]] = []

        async def hold_failure(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below, once the exception says what it was
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except ServeError as e:
            held[:] = [{**message, "message": str(e)} for message in held]
            raise
        finally:  # whatever the app raised (or if it did not raise after it), the failure is reported
            for message in held:
                await send(message)


# =============================================================================== request bodies


class TrackedSend:
    """An ASGI ``send`` that notes when the answer's status has gone: from then on an answer can end, not change."""

    def __init__(self, send: Send) -> None:
        self.send, self.started = send, False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class BodyLimits:
    """ASGI middleware: every request body within a size limit (by method and path) and a time limit.
    ``refused`` is told of each request answered here (not by the app), to count it like the app's refusals;
    ``error`` gives the JSON body of such an answer from the path and the refusal (default ``{"error": reason}``;
    the language-model server answers its /v1 routes in OpenAI's error shape, as its app does)."""

    def __init__(self, app: Any, limit: Callable[[str, str], int], timeout_s: float,
                 refused: Callable[[Rejected], None] | None = None,
                 error: Callable[[str, Rejected], Any] | None = None) -> None:
        self.app, self.limit, self.timeout_s, self.refused, self.error = app, limit, timeout_s, refused, error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limit(scope["method"], scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        too_big = f"over the upload limit of {limit} bytes: send a smaller body (for images: fewer or smaller ones at once)"
        tracked_send = TrackedSend(send)
        try:
            async with asyncio.timeout(self.timeout_s) as timer:
                if declared is not None and (not declared.isdigit() or int(declared) > limit):
                    if not declared.isdigit():
                        return await self._answer(send, Rejected(400, f"Content-Length {declared.decode(errors='replace')!r} is not a number",
                                                                      "bad_request"), path=scope["path"])
                    if headers.get(b"expect", b"").lower() != b"100-continue":  # the body is on its way: take it, drop it
                        await self._drain(receive)
                    return await self._answer(send, Rejected(413, f"body of {int(declared)} bytes is {too_big}", "too_large"),
                                              path=scope["path"])
                received = 0

                async def limited() -> dict[str, Any]:
                    nonlocal received
                    message = await receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > limit:
                            if message.get("more_body"):
                                await self._drain(receive)
                            raise Rejected(413, f"body is {too_big}", "too_large")
                        if not message.get("more_body"):
                            timer.reschedule(None)  # all here: the time limit is for the body only
                    return message

                await self.app(scope, limited, tracked_send)
        except TimeoutError:
            if not tracked_send.started:
                await self._answer(send, Rejected(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                                       "(--body-timeout): send it at once", "timeout"), close=True, path=scope["path"])
        finally:
            release(scope)  # answered here (a 413 after its body was drained): it no longer waits for the ring

    @staticmethod
    async def _drain(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _answer(self, send: Send, e: Rejected, close: bool = False, path: str = "") -> None:
        if self.refused is not None:  # in /metrics like every refusal the app answers
            self.refused(e)
        status, body = e.status, orjson.dumps({"error": e.reason} if self.error is None else self.error(path, e))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Parts:
    """The parts of a multipart/form-data body as python-multipart's streaming parser finds them
    (the parser Starlette's form is built on, driven here directly: Starlette's form makes an
    UploadFile with a spooled temporary file per part, 26 us of CPU a part on this machine
    against 8 here, and a 64-image request of Fashion-MNIST PNGs spends more on that than the
    smallest stitch spends classifying them)."""

    def __init__(self) -> None:
        self.parts: list[tuple[bytes | None, bytes | None, bytes]] = []  # (name, filename, content)
        self._field, self._value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._on_field, "on_header_value": self._on_value,
                "on_header_end": self._header_end, "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._chunks = {}, []

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def _end(self) -> None:
        self.parts.append((*_disposition(self._headers.get(b"content-disposition", b"")), b"".join(self._chunks)))


# The Content-Disposition every common client sends (httpx, requests, curl, browsers): read by one
# regular expression; anything else (other case, escapes, more parameters) by python-multipart's parser.
_PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\;]*)"(?:; filename="([^"\\;]*)")?')
_HEADER_NAME = re.compile(rb"[A-Za-z0-9-]+")
_MAX_PLAIN_HEADERS = 8  # python-multipart's default limit per part (more: its error)


def _disposition(value: bytes) -> tuple[bytes | None, bytes | None]:
    """(name, filename) of a part's Content-Disposition, as python-multipart's parse_options_header reads them."""
    m = _PLAIN_DISPOSITION.fullmatch(value)
    if m is not None:
        return m.group(1), m.group(2)
    _, options = parse_options_header(value)
    return options.get(b"name"), options.get(b"filename")


def split_plain(body: bytes, boundary: bytes, max_parts: int) -> list[tuple[bytes | None, bytes | None, bytes]] | None:
    """The parts of a multipart body in the plain form clients send (no preamble or epilogue, each
    part a few ``Name: value`` header lines, CRLF throughout), found with a few ``bytes.find``
    calls instead of python-multipart's byte-by-byte header parsing (about 16 us of CPU a part
    here, as much as the smallest stitch spends classifying the image). None for anything else,
    or for more than ``max_parts`` parts: then python-multipart parses the body, and answers
    malformed ones with its own reasons. For the bodies it reads, it finds what python-multipart
    finds (``tests/test_serve.py`` compares them)."""
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if not body.startswith(dash + b"\r\n"):
        return None
    parts: list[tuple[bytes | None, bytes | None, bytes]] = []
    at = len(dash) + 2
    while True:
        head_end = body.find(b"\r\n\r\n", at, at + 1024)
        end = body.find(delimiter, at)
        if head_end < 0 or end < 0 or head_end + 2 > end or len(parts) == max_parts:
            return None
        headers: dict[bytes, bytes] = {}
        lines = body[at:head_end].split(b"\r\n")
        if len(lines) > _MAX_PLAIN_HEADERS:
            return None
        for line in lines:
            name, sep, value = line.partition(b": ")
            if not sep or not _HEADER_NAME.fullmatch(name) or value[:1] in (b" ", b"\t") or b"\r" in value or b"\n" in value:
                return None
            headers[name.lower()] = value
        start = head_end + 4
        if start > end:  # an empty part: its data starts where the delimiter's CRLF is
            return None
        parts.append((*_disposition(headers.get(b"content-disposition", b"")), body[start:end]))
        after = body[end + len(delimiter):end + len(delimiter) + 2]
        if after == b"\r\n":
            at = end + len(delimiter) + 2
        elif after == b"--" and body[end + len(delimiter) + 2:] in (b"", b"\r\n"):
            return parts
        else:
            return None


class MultipartImages:
    """The images of a multipart/form-data body, fed chunk by chunk as it arrives (:meth:`write`),
    then parsed and checked (:meth:`finish`): one file part named ``file`` per image, at most
    ``max_images``. A body in the plain form clients send is split by :func:`split_plain`; any
    other goes through python-multipart's streaming parser (the same parts; its reasons for a
    malformed one). Its size is bounded by :class:`BodyLimits` while it arrives."""

    def __init__(self, content_type: str, max_images: int) -> None:
        self.max_images = max_images
        self.too_many = f"a request carries at most {max_images} images (--max-batch): split the batch"
        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise Rejected(400, "malformed multipart body: the content type has no boundary", "bad_batch")
        if len(boundary) > MAX_BOUNDARY_LENGTH:
            raise Rejected(400, f"malformed multipart body: the boundary is {len(boundary)} bytes, over "
                                f"{MAX_BOUNDARY_LENGTH}", "bad_batch")
        self.boundary = boundary
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def _parsed(self) -> list[tuple[bytes | None, bytes | None, bytes]]:
        body = b"".join(self.chunks)
        plain = split_plain(body, self.boundary, self.max_images)
        if plain is not None:
            return plain
        found = _Parts()
        parser = MultipartParser(self.boundary, found.callbacks())
        try:
            parser.write(body)
            parser.finalize()
        except MultipartParseError as e:
            raise Rejected(400, f"malformed multipart body: {first_line(e)}", "bad_batch") from e
        if parser.state != MultipartState.END:  # python-multipart's finalize() does not check (its TODO)
            raise Rejected(400, "malformed multipart body: it ends before its closing boundary", "bad_batch")
        return found.parts

    def finish(self) -> list[bytes]:
        parts = self._parsed()
        # a part without a name (no Content-Disposition) is named as such, not listed as an empty name
        others = sorted({"(a part without a name)" if name is None else name.decode(errors="replace") for name, _, _ in parts}
                        - {"file"})
        if others:
            raise Rejected(400, f"unexpected form field(s) {', '.join(others)}: send images as file parts named `file`", "bad_batch")
        if not parts:
            raise Rejected(400, "the form has no `file` part: send each image as a file part named `file`", "bad_batch")
        if any(filename is None for _, filename, _ in parts):
            raise Rejected(400, "`file` must be a file part (with a filename), not a text field", "bad_batch")
        if len(parts) > self.max_images:
            raise Rejected(413, self.too_many, "bad_batch")
        return [content for _, _, content in parts]


async def _image_parts(request: Request, max_images: int) -> list[bytes]:
    """The images of a multipart/form-data request, parsed as its body streams in."""
    images = MultipartImages(request.headers.get("content-type", ""), max_images)
    async for chunk in request.stream():
        images.write(chunk)
    return images.finish()


# =============================================================================== routes


async def predict(svc: Service, request: Request) -> Response:
    """A PNG/JPEG as the raw body, multipart file part(s) named `file` (several = a batch), or a
    raw tensor (.npy / safetensors)."""
    svc.handling += 1  # from before its body arrives: the latency path runs a request only when it is alone
    try:
        return await _predict(svc, request)
    finally:
        svc.handling -= 1
        release(request.scope)  # refused or failed before the ring: no longer waiting for it


def _decode(svc: Service, blobs: list[bytes], array: np.ndarray | None, out: np.ndarray) -> None:
    if array is None:
        svc.preprocess.images(blobs, out)
    else:
        svc.preprocess.array(array, out)


async def _run_inline(svc: Service, request: Request, blobs: list[bytes], array: np.ndarray | None, n: int) -> BatchResult | None:
    """The request run in this process (:mod:`.inline`), or None when it must go to the model process."""
    inline = svc.inline
    assert inline is not None
    if request.scope.get(KEY) is None:
        # not read by the stamping protocol (Ray Serve's proxy, an app under another server): requests read meanwhile
        # are not in svc.upstream, so one turn of the event loop lets them start and count in svc.handling (~10 µs)
        if inline.choose(n, svc.batcher, svc.handling) is None:
            return None
        await asyncio.sleep(0)
    decision = inline.choose(n, svc.batcher, svc.handling, len(svc.upstream))
    if decision is None:  # not a lone small request, or the model process is busy
        return None
    x = inline.x[:n]
    _decode(svc, blobs, array, x)
    try:
        return inline.run(x, decision)
    except Exception as e:  # noqa: BLE001 - as a failed batch: this request gets a 500, the server goes on
        log.exception("the model failed on a request run in the server process")
        raise Rejected(500, f"the model failed on this batch ({type(e).__name__}: {first_line(e)}); the server goes on",
                       "model_error") from e


def _answered(svc: Service, result: BatchResult, latency: float, inline_arrived: float | None) -> None:
    """The metrics of an answered request; one run in this process (arrived at ``inline_arrived``)
    is also told to the model process's policy."""
    if inline_arrived is not None:
        svc.metrics.ran_inline(result.info)
        svc.batcher.observe_inline(result.info.size, inline_arrived, latency * 1e3)
        assert svc.inline is not None
        svc.inline.forwards.trace_pending()  # a stitch run eager here for the first time is compiled, after its answer
    svc.metrics.latency.observe(latency)
    svc.metrics.requests.labels("200").inc()
    svc.metrics.queue.set(svc.batcher.held)


async def _predict(svc: Service, request: Request) -> Response:
    started = time.perf_counter()
    # when its first bytes were read (.upstream): a burst delays the handler's start by every request read before it
    arrived = request.scope.get(ARRIVED, started)
    c, batcher = svc.config, svc.batcher
    ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        array = None
        if ctype == "multipart/form-data":
            blobs = await _image_parts(request, c.max_batch)
        else:
            body = await request.body()
            if not body:
                raise Rejected(400, "empty body: send a PNG or JPEG as the body, multipart file part(s) named `file`, "
                                    "or an array (application/x-npy)", "empty")
            if ctype in ARRAY_TYPES:
                array = read_array(body, ARRAY_TYPES[ctype])
                if len(array) > c.max_batch:
                    raise Rejected(413, f"a request carries at most {c.max_batch} images (--max-batch): split the batch", "bad_batch")
            blobs = [body]
        n = len(array) if array is not None else len(blobs)
        result = await _run_inline(svc, request, blobs, array, n) if svc.inline is not None else None
        inline = result is not None
        in_ring = started  # inline: no ring (set again when the request is put in it)
        if result is None:
            segments = batcher.reserve(n)  # a full server refuses here, before decoding; nothing was held while the body arrived
            try:
                at = 0
                for offset, k in segments:  # one run of the ring unless it is fragmented: each run its share, in order
                    _decode(svc, blobs[at:at + k], None if array is None else array[at:at + k], batcher.ring[offset:offset + k])
                    at += k
                future = batcher.submit(segments, n, arrived)
            except BaseException:
                batcher.release(segments)
                raise
            in_ring = time.perf_counter()
            release(request.scope)
            svc.upstream.worked((in_ring - started) * 1e3, n)
            svc.metrics.before_ring.observe(in_ring - arrived)
            svc.metrics.queue.set(batcher.held)
            try:
                with refused_at_shutdown(f"{request.method} {request.url.path}", log):
                    result = await future
            except RuntimeError as e:  # the model failed on this batch (logged with its traceback by the model process)
                raise Rejected(500, f"the model failed on this batch ({e}); the server goes on", "model_error") from e
        if array is not None and array.dtype == np.float32 and not np.isfinite(result.probs).all():
            # finite input far outside normalised images (1e38) overflows in the network: no class to answer
            raise Rejected(422, "the network's output for this array is not finite: its values are far outside normalised "
                                "images; send float32 input normalised with the network's mean and std, or uint8 pixels",
                           "bad_array")
    except Rejected as e:
        svc.metrics.queue.set(batcher.held)
        return _reject(e, svc.metrics)
    latency = time.perf_counter() - arrived
    # recorded after the answer is written (the handler returns first): ~20 µs a request off its latency
    asyncio.get_running_loop().call_soon(_answered, svc, result, latency, arrived if inline else None)
    info, d = result.info, result.decision
    row = svc.rows[d.stitch]
    if NPY in request.headers.get("accept", ""):
        import io

        buf = io.BytesIO()
        np.save(buf, result.probs, allow_pickle=False)
        return Response(buf.getvalue(), 200, {"x-snnet-stitch": str(d.stitch), "x-snnet-stitch-name": d.name,
                                              "x-snnet-mode": "pinned" if d.pinned else "auto",
                                              "x-snnet-inline": "1" if inline else "0",
                                              "x-snnet-latency-ms": f"{latency * 1e3:.3f}"}, media_type=NPY)
    return _json({
        "predictions": [{"class": int(k), "probs": p} for k, p in zip(result.probs.argmax(-1), result.probs)],
        "stitch": {"id": d.stitch, "name": d.name, "acc1": row.acc1, "flops": row.flops},
        "mode": "pinned" if d.pinned else "auto",
        "inline": inline,  # run in the server process (the latency path), not in a batch of the model process
        "batch": {"id": None if inline else info.batch_id, "size": info.size, "compute_ms": round(info.compute_ms, 3),
                  "predicted_ms": None if d.predicted_ms is None else round(d.predicted_ms, 3), "reason": d.reason},
        "latency_ms": round(latency * 1e3, 3),
        # from its arrival (first bytes read) to its place in the ring: the wait and work in this process before the model
        "before_ring_ms": round((in_ring - arrived) * 1e3, 3),
    })


def _who(fleet: Fleet | None) -> dict[str, str]:
    return {"replica": fleet.name} if fleet is not None else {}


async def health(svc: Service, fleet: Fleet | None = None) -> Response:
    """200 with the stitch in use while the model process answers; 503 when it does not."""
    try:
        # bounded by the ask (CONTROL_TIMEOUT_S); shield: the shared ask outlives a probe that gives up
        state = await asyncio.shield(svc.batcher.model_state())
    except Rejected as e:
        return _json({"status": e.reason}, 503)
    return _json({"status": "ok", **state, "held": svc.batcher.held, "server_pid": os.getpid(),
                  # this process's mean work per request, handler start to the ring, and the requests read and not yet there
                  "server_work_ms": round(svc.upstream.work_ms, 3), "before_ring": len(svc.upstream),
                  "gc_frozen": gc.get_freeze_count(), **_who(fleet)})  # objects kept out of full collections (snnet.deploy.heap)


async def metrics(svc: Service, fleet: Fleet | None = None) -> Response:
    return Response(await fleet.metrics(svc) if fleet else svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def get_stitch(svc: Service, fleet: Fleet | None = None) -> Response:
    try:
        return _json({**await svc.batcher.ask("policy"), **_who(fleet)})
    except Rejected as e:
        return _reject(e, svc.metrics)


async def apply_setting(svc: Service, setting: dict[str, Any]) -> dict[str, Any]:
    """Pin ``setting["stitch"]``, or with "auto" return to automatic choice (``setting["policy"]``, if given), in this
    server's model process; its answer."""
    key = setting["stitch"]
    return await (svc.batcher.ask("auto", setting.get("policy")) if key == "auto" else svc.batcher.ask("pin", key))


async def put_stitch(svc: Service, request: Request, fleet: Fleet | None = None) -> Response:
    """Body {"stitch": <id or name>} pins one; {"stitch": "auto"} returns to automatic choice, with
    an optional "policy" (controller or last-second). Needs the admin token. Applied here first
    (an unknown stitch is a 404 here), then published to the other replicas of a fleet."""
    usage = f'send JSON {{"stitch": <id or name>}} to pin one, or {{"stitch": "auto"}} (optionally with "policy": one of {list(POLICIES)})'
    try:
        check_admin(svc.admin_token, request.headers.get("authorization"))
        raw = await request.body()  # at most ADMIN_BODY_LIMIT bytes (BodyLimits): parsing it is bounded
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as e:
            raise Rejected(400, f"the body is not JSON ({type(e).__name__}): {usage}", "bad_request") from e
        key = body.get("stitch") if isinstance(body, dict) else None
        policy = body.get("policy") if isinstance(body, dict) else None
        if not isinstance(key, (int, str)) or isinstance(key, bool) or (policy is not None and (key != "auto" or policy not in POLICIES)):
            raise Rejected(400, usage, "bad_request")
        setting = {"stitch": key, "policy": policy}
        with refused_at_shutdown(f"{request.method} {request.url.path}", log):  # a model process that hangs
            answer = await (fleet.steer(svc, setting) if fleet is not None else apply_setting(svc, setting))
    except Rejected as e:
        return _reject(e, svc.metrics)
    return _json({**answer, **_who(fleet)})


# =============================================================================== the app


def not_served(request: Request, e: HTTPException) -> str:
    """The message of Starlette's own 404 or 405, with the routes the app serves (read from the app: never a list
    that falls behind it)."""
    routes = ", ".join(f"{method} {route.path}" for route in request.app.routes if isinstance(route, APIRoute)
                       for method in sorted(route.methods - {"HEAD"}))
    return f"{e.detail}: {request.method} {request.url.path}; this server answers {routes}"


def body_limit(config: ServeConfig) -> Callable[[str, str], int]:
    """Largest body per method and path: images for /predict, a few bytes for admin requests."""
    def limit(method: str, path: str) -> int:
        # "/predict/" too: the app redirects it to /predict (307), which an image over the admin limit never reached
        return config.max_upload_bytes if path.rstrip("/") == "/predict" else ADMIN_BODY_LIMIT
    return limit


def create_app(source: ServeConfig | Service, *, factory: Callable[[], Service] | None = None, fleet: Fleet | None = None,
               freeze: bool = False, graceful_shutdown_s: float = Listen.timeout_graceful_shutdown) -> FastAPI:
    """The FastAPI app. ``source``: a :class:`Service` to serve (its owner closes its model
    process), or a config: then, when the server starts, ``factory`` makes the Service (worker
    processes join a model process that way), or by default a model process of its own is started
    (and stopped with the server). ``fleet``: the replicas this server is one of (Ray Serve).
    ``freeze``: this process only serves (``snnet serve``, a worker, a Ray replica): once started,
    what it has loaded is kept out of the garbage collector's full passes (:mod:`snnet.deploy.heap`),
    not done for an app run inside another program (a test, a notebook). ``graceful_shutdown_s``: the
    server's graceful shutdown (uvicorn's ``--timeout-graceful-shutdown``, Ray's ``graceful_shutdown_timeout_s``):
    at shutdown, requests already sent to the model process are waited for this long at most (a model process
    that hangs held the shutdown for 10 minutes, whatever the server's setting)."""
    config = source.config if isinstance(source, Service) else source

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(source, Service):
            svc, owned = source, False
        else:
            svc, owned = await asyncio.to_thread(factory or (lambda: Service.load(config))), True
        app.state.service = svc
        try:
            svc.start()
            if fleet is not None:
                await fleet.start(svc)  # the setting the other replicas follow, before the first request
            policy = await svc.batcher.ask("policy")
        except BaseException:  # a failed start: the model process this app started goes now, not at the process's exit
            await svc.stop(graceful_shutdown_s)
            if owned:
                await asyncio.to_thread(svc.close, graceful_shutdown_s)
            raise
        log.info("serving %s: %d stitches, %d on the ladder (%s ... %s), SLO %.1f ms, max batch %d, %s",
                 svc.config.model, len(svc.rows), len(policy["ladder"]), policy["ladder"][0]["name"], policy["ladder"][-1]["name"],
                 svc.config.slo_ms, svc.config.max_batch,
                 "pinned to " + policy["current"]["name"] if policy["mode"] == "pinned" else f"automatic ({policy['policy']})")
        if freeze:
            freeze_heap()  # no full collection of torch, the network and its graphs mid-request: a 100 ms pause each
        try:
            yield
        finally:
            if fleet is not None:
                await fleet.stop()
            await svc.stop(graceful_shutdown_s)  # every request already sent to the model is answered first (within the bound)
            if owned:
                await asyncio.to_thread(svc.close, graceful_shutdown_s)

    docs = config.docs
    app = FastAPI(title="snnet serve", summary="One stitchable network, switching stitches to hold a latency target",
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)

    def service(request: Request) -> Service:
        return request.app.state.service

    @app.post("/predict")
    async def _predict(request: Request) -> Response:
        """A PNG/JPEG as the raw body, multipart file part(s) named `file`, or an array (application/x-npy)."""
        return await predict(service(request), request)

    @app.get("/health")
    async def _health(request: Request) -> Response:
        return await health(service(request), fleet)

    @app.get("/metrics")
    async def _metrics(request: Request) -> Response:
        return await metrics(service(request), fleet)

    @app.get("/stitch")
    async def _get_stitch(request: Request) -> Response:
        return await get_stitch(service(request), fleet)

    @app.put("/stitch")
    async def _put_stitch(request: Request) -> Response:
        """Pin a stitch or go back to automatic choice (needs `Authorization: Bearer <admin token>`)."""
        return await put_stitch(service(request), request, fleet)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, e: Rejected) -> Response:  # raised while a body is read (413)
        return _reject(e, service(request).metrics)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Response:  # Starlette's own 404, 405: the same error shape
        return _json({"error": not_served(request, e)}, e.status_code, e.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> Response:  # the client left mid-upload: nobody to answer
        return Response(status_code=400)

    app.add_middleware(BodyLimits, limit=body_limit(config), timeout_s=config.body_timeout_s,
                       refused=lambda e: count_refusal(e, app.state.service.metrics))
    app.add_middleware(OneLineStartFailure)
    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory snnet.deploy.serve:app_from_env`` (worker processes): its
    config is the JSON in ``$SNNET_SERVE_CONFIG``, it joins the model process in ``$SNNET_SERVE_ENGINE``,
    and its shutdown is bounded by ``$SNNET_SERVE_GRACEFUL_S`` (the server's --timeout-graceful-shutdown)."""
    text, engine, graceful = os.environ.get(ENV_CONFIG), os.environ.get(ENV_ENGINE), os.environ.get(ENV_GRACEFUL)
    if not text or not engine or not graceful:
        raise ServeError(f"${ENV_CONFIG}, ${ENV_ENGINE} and ${ENV_GRACEFUL} are not all set: start the server with "
                         "`snnet serve --workers N`")
    config = ServeConfig.from_json(text)
    address, key = engine.rsplit(" ", 1)
    return create_app(config, factory=lambda: Service.attach(config, address, bytes.fromhex(key)), freeze=True,
                      graceful_shutdown_s=float(graceful))
