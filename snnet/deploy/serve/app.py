"""The FastAPI app: routes, request bodies and multipart parsing; the service lives in ``app.state``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.formparsers import MultiPartException, MultiPartParser

from ...errors import ServeError, StitchNotFoundError
from .batcher import BatchResult
from .config import ENV_CONFIG, ServeConfig, log
from .metrics import Metrics
from .rejected import Rejected
from .service import Service

__all__ = ["app_from_env", "create_app"]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing one over ``limit`` bytes before reading it all."""
    length = request.headers.get("content-length")
    too_big = f"over the upload limit of {limit} bytes (--max-upload-mb): send a smaller image or fewer at once"
    if length is not None:
        if not length.isdigit():
            raise Rejected(400, f"Content-Length {length!r} is not a number", "bad_request")
        if int(length) > limit:
            raise Rejected(413, f"body of {length} bytes is {too_big}", "too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise Rejected(413, f"body is {too_big}", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_parts(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The images of a multipart/form-data body: one file part named ``file`` per image."""
    async def once() -> AsyncIterator[bytes]:
        yield body

    too_many = f"a request carries at most {max_images} images (--max-batch): split the batch"
    parser = MultiPartParser(request.headers, once(), max_files=max_images + 1, max_fields=max_images + 1,
                             max_part_size=len(body) + 1)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many" in e.message:
            raise Rejected(413, too_many, "bad_batch") from e
        raise Rejected(400, f"malformed multipart body: {e.message}", "bad_batch") from e
    except ValueError as e:  # python-multipart's parse errors
        raise Rejected(400, f"malformed multipart body: {str(e).splitlines()[0] if str(e) else 'cannot parse'}", "bad_batch") from e
    try:
        others = sorted(set(form.keys()) - {"file"})
        if others:
            raise Rejected(400, f"unexpected form field(s) {', '.join(others)}: send images as file parts named `file`", "bad_batch")
        parts = form.getlist("file")
        if not parts:
            raise Rejected(400, "the form has no `file` part: send each image as a file part named `file`", "bad_batch")
        if any(isinstance(p, str) for p in parts):
            raise Rejected(400, "`file` must be a file part (with a filename), not a text field", "bad_batch")
        if len(parts) > max_images:
            raise Rejected(413, too_many, "bad_batch")
        return [await p.read() for p in parts]  # type: ignore[union-attr]
    finally:
        await form.close()



def _reject(e: Rejected, metrics: Metrics) -> JSONResponse:
    metrics.rejected.labels(e.kind).inc()
    metrics.requests.labels(str(e.status)).inc()
    return JSONResponse({"error": e.reason}, status_code=e.status, headers=e.headers)


def create_app(config_or_service: ServeConfig | Service) -> FastAPI:
    """The FastAPI app. Given a config, the network is loaded when the server starts (each worker
    process loads its own); given a :class:`Service`, that one is served."""
    holder: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = config_or_service if isinstance(config_or_service, Service) else \
            await asyncio.to_thread(Service.load, config_or_service)
        holder["svc"] = svc
        svc.batcher.start()
        c = svc.controller
        log.info("serving %s: %d stitches, %d on the ladder (%s ... %s), SLO %.1f ms, max batch %d, %s",
                 svc.config.model, len(svc.rows), len(c.rungs), c.rungs[0].name, c.rungs[-1].name, svc.config.slo_ms,
                 svc.config.max_batch, "pinned to " + c.current.name if c.pinned else "automatic")
        try:
            yield
        finally:
            await svc.batcher.close()  # every request already queued is answered first

    app = FastAPI(title="snnet serve", summary="One stitchable network, switching stitches to hold a latency target",
                  lifespan=lifespan)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        """A PNG/JPEG as the raw body, or as multipart file part(s) named `file` (several = a batch)."""
        arrived = time.perf_counter()
        svc = holder["svc"]
        c = svc.config
        try:
            with svc.batcher.admit():  # a full server refuses before anything is read or decoded
                body = await _read_body(request, c.max_upload_bytes)
                if not body:
                    raise Rejected(400, "empty body: send a PNG or JPEG as the body, or as multipart file part(s) named `file`", "empty")
                if request.headers.get("content-type", "").lower().startswith("multipart/"):
                    blobs = await _image_parts(request, body, c.max_batch)
                else:
                    blobs = [body]
                with svc.batcher.reserve(len(blobs)):
                    x = await asyncio.get_running_loop().run_in_executor(svc.batcher.decoder, svc.decode, blobs)
                future = svc.batcher.submit(x, arrived)  # no await since the room was released: it is still there
            try:
                result: BatchResult = await future
            except Exception as e:  # noqa: BLE001 - the model failed on this batch (logged with its traceback)
                raise Rejected(500, f"the model failed on this batch ({type(e).__name__}); the server goes on", "model_error") from e
        except Rejected as e:
            return _reject(e, svc.metrics)
        d = result.decision
        latency = time.perf_counter() - arrived
        svc.metrics.latency.observe(latency)
        svc.metrics.requests.labels("200").inc()
        top = result.probs.argmax(-1).tolist()
        return JSONResponse({
            "predictions": [{"class": k, "probs": p} for k, p in zip(top, result.probs.tolist())],
            "stitch": {"id": d.stitch, "name": d.name, "acc1": svc.rows[d.stitch].get("acc1"), "flops": svc.rows[d.stitch]["flops"]},
            "mode": "pinned" if d.pinned else "auto",
            "batch": {"id": result.batch_id, "size": result.batch_size, "compute_ms": round(result.compute_ms, 3),
                      "predicted_ms": None if d.predicted_ms is None else round(d.predicted_ms, 3), "reason": d.reason},
            "latency_ms": round(latency * 1e3, 3),
        })

    @app.get("/health")
    async def health() -> dict[str, Any]:
        svc = holder["svc"]
        return {"status": "ok", "stitch": svc.controller.current.name, "mode": "pinned" if svc.controller.pinned else "auto",
                "queue": svc.batcher.waiting, "batches": svc.batcher.batches}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(holder["svc"].metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stitch")
    async def get_stitch() -> dict[str, Any]:
        return holder["svc"].controller.policy()

    @app.put("/stitch")
    async def put_stitch(request: Request) -> Response:
        """Body {"stitch": <id or name>} pins one; {"stitch": "auto"} returns to automatic choice."""
        svc = holder["svc"]
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        key = body.get("stitch") if isinstance(body, dict) else None
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            return _reject(Rejected(400, 'send JSON {"stitch": <id or name>} to pin one, or {"stitch": "auto"}', "bad_request"),
                           svc.metrics)
        if key == "auto":
            svc.controller.unpin()
        else:
            try:
                svc.pin(key)
            except StitchNotFoundError as e:
                return _reject(Rejected(404, str(e).splitlines()[0], "bad_request"), svc.metrics)
        return JSONResponse(svc.controller.policy())

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory snnet.deploy.serve:app_from_env`` (worker processes): its
    config is the JSON in ``$SNNET_SERVE_CONFIG``."""
    text = os.environ.get(ENV_CONFIG)
    if not text:
        raise ServeError(f"${ENV_CONFIG} is not set: start the server with `snnet serve`")
    return create_app(ServeConfig.from_json(text))
