"""Serving one SN-Net over HTTP, switching stitches to hold a latency target as load changes.

The pieces, outermost first:

* :func:`create_app` — a FastAPI app (run by uvicorn): ``POST /predict``, ``GET /health``,
  ``GET /metrics`` (Prometheus text), ``GET``/``PUT /stitch``. Handlers only read and check the
  request, decode images (on one decoding thread, off the event loop) and wait for their batch.
* :class:`Batcher` — dynamic batching on the event loop: requests queue in arrival order (a
  bounded queue: past ``max_queue`` images a request gets 503 at once); a batch closes when it
  holds ``max_batch`` images or ``max_wait_ms`` after its first request arrived; the
  :class:`~snnet.deploy.controller.StitchController` names its stitch; one worker thread runs
  the batches one after another (torch releases the GIL while it computes). A batch runs wholly
  on the stitch chosen for it, and batches run in order, so switching never drops or reorders
  a request.
* :class:`Service` — the network, its ladder of Pareto-optimal stitches, the latency table
  (from ``results.json`` when ``snnet profile --batch-sizes`` wrote one, else measured here at
  start), the controller and the metrics.

Images: PNG or JPEG, decoded with Pillow after checking the declared size against
``max_pixels`` (a decompression bomb is refused before it is decoded), converted to the
network's channels and, by default, resized and normalised exactly as ``snnet eval`` reads an
image folder (timm's eval transform for the network's data config); with ``resize=False`` an
image of another size or channel count is refused instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.formparsers import MultiPartException, MultiPartParser

from ..data import image_transform
from ..errors import ServeError, StitchNotFoundError
from ..model import StitchedNet
from ..results import merge_rows, read_rows
from .controller import ControllerConfig, Decision, LatencyTable, Rung, StitchController, ladder
from .profiling import profile

__all__ = ["ENV_CONFIG", "Batcher", "Rejected", "ServeConfig", "Service", "app_from_env", "create_app", "decode_image"]

ENV_CONFIG = "SNNET_SERVE_CONFIG"  # the config, as JSON, for worker processes that import the app
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format


@dataclass(frozen=True)
class ServeConfig:
    """What ``snnet serve`` runs: the network, the SLO, batching and the limits on input."""

    model: str  # a folder written by StitchedNet.save_pretrained
    results: str | None = None  # results.json: top-1 (ranks the ladder) and latency_by_batch (the table)
    slo_ms: float = 50.0  # p95 end-to-end latency target
    max_batch: int = 16  # images per model batch; also the most images one request may carry
    max_wait_ms: float = 2.0  # how long a batch waits to fill after its first request arrived
    max_queue: int = 256  # images held at most (queued, being decoded, requests being read as one each); past it, 503
    max_upload_bytes: int = 4 * 2 ** 20
    max_pixels: int = 4096 * 4096  # per image, checked from the header before decoding
    resize: bool = True  # resize/convert any image to the network's input (False: refuse other sizes)
    stitch: str | None = None  # pin this stitch (id or name) from the start; None: automatic
    threads: int = 1  # torch CPU threads of this process
    up_after: int = 5  # decisions in a row with room to spare before a more accurate stitch is taken
    profile_repeats: int = 10  # timed forwards per stitch and batch size when profiling at start

    def __post_init__(self) -> None:
        checks = [(self.slo_ms > 0, "--slo-ms must be > 0"), (self.max_batch >= 1, "--max-batch must be >= 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
                  (self.max_queue >= self.max_batch, "--max-queue must be at least --max-batch"),
                  (self.max_upload_bytes >= 1, "--max-upload-mb must be > 0"), (self.max_pixels >= 1, "--max-pixels must be >= 1"),
                  (self.threads >= 1, "--threads must be >= 1"), (self.up_after >= 1, "--up-after must be >= 1"),
                  (self.profile_repeats >= 1, "profile_repeats must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ServeError(message)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# =============================================================================== bad input


class Rejected(Exception):
    """A request refused with an HTTP status and a one-line reason (``kind`` labels the metric)."""

    def __init__(self, status: int, reason: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}


_FORMATS = ("PNG", "JPEG")
_MODES = {1: "L", 3: "RGB"}


def decode_image(data: bytes, input_size: Sequence[int], *, resize: bool = True, max_pixels: int = 4096 * 4096) -> Image.Image:
    """One PNG/JPEG decoded, in the network's channels (L or RGB), or :class:`Rejected` saying why not."""
    if not data:
        raise Rejected(400, "an image is empty (0 bytes): send the bytes of a PNG or JPEG", "empty")
    channels, height, width = (int(v) for v in input_size)
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard (over twice its MAX_IMAGE_PIXELS)
        raise Rejected(413, f"image declares too many pixels ({e}); send at most {max_pixels} pixels", "too_many_pixels") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for what is not an image
        raise Rejected(415, "body is not a PNG or JPEG image (or its header is damaged): send image/png or image/jpeg", "not_image") from e
    w, h = img.size
    if w * h > max_pixels:  # before decoding: the header of a few bytes can declare gigapixels
        raise Rejected(413, f"image declares {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (--max-pixels); "
                            f"send a smaller image (this network reads {width}x{height})", "too_many_pixels")
    mode = _MODES.get(channels)
    if not resize and ((w, h) != (width, height) or img.mode != mode):
        raise Rejected(422, f"image is {w}x{h} {img.mode}, this network takes {width}x{height} {mode} and the server "
                            "refuses other sizes (--no-resize): resize it first", "wrong_size")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError... by format
        raise Rejected(400, f"image data is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                            "send the whole file", "truncated") from e
    if mode is None:
        raise Rejected(422, f"this network takes {channels}-channel input; only 1 (grayscale) or 3 (RGB) can be served", "wrong_size")
    return img.convert(mode) if img.mode != mode else img


class Preprocess:
    """Decoded images -> the network's normalised input batch, as ``snnet eval`` reads an image
    folder: timm's eval transform for the network's data config. An image already of the input
    size skips the (identity) resize and crop and is normalised with the rest of its request in
    one tensor operation: the same numbers, without four tensor ops per image (a 28x28 image
    costs less to classify than to push through the transform one by one)."""

    def __init__(self, data_config: dict[str, Any], input_size: Sequence[int]) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        self.transform = image_transform(dict(data_config, input_size=self.input_size))
        c = self.input_size[0]
        mean = torch.tensor(data_config.get("mean", (0.0,) * c), dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        std = torch.tensor(data_config.get("std", (1.0,) * c), dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        self.shift, self.scale = mean * 255, std * 255  # (x / 255 - mean) / std = (x - 255 mean) / (255 std)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        c, h, w = self.input_size
        exact = [k for k, img in enumerate(images) if img.size == (w, h)]
        out = torch.empty(len(images), c, h, w)
        if exact:
            raw = torch.from_numpy(np.stack([np.asarray(images[k]) for k in exact])).reshape(len(exact), h, w, c)
            out[exact] = (raw.permute(0, 3, 1, 2).float() - self.shift) / self.scale
        for k, img in enumerate(images):
            if img.size != (w, h):
                out[k] = self.transform(img)
        return out


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


# =============================================================================== metrics


class Metrics:
    """Prometheus metrics of one server process.

    In a single process they live in this server's own registry. Under ``uvicorn --workers N``
    (``PROMETHEUS_MULTIPROC_DIR`` set, as ``snnet serve --workers`` does) every process writes
    its values to that folder and ``/metrics`` reports all of them, whichever worker answers:
    counters and histograms summed, gauges per process (``pid`` label) or summed (queue depth).
    """

    def __init__(self) -> None:
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        reg: CollectorRegistry | None = self.registry
        if multiproc:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            reg = None  # values go to the shared folder; the collector reads them all
        seconds = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
        self.requests = Counter("snnet_requests", "Requests answered, by HTTP status", ["code"], registry=reg)
        self.rejected = Counter("snnet_rejected", "Requests refused, by reason", ["reason"], registry=reg)
        self.images = Counter("snnet_images", "Images classified, by the stitch that served them", ["stitch"], registry=reg)
        self.latency = Histogram("snnet_request_latency_seconds", "End-to-end latency of answered predictions (arrival to result)",
                                 buckets=seconds, registry=reg)
        self.batch_seconds = Histogram("snnet_batch_seconds", "Model time per batch", buckets=seconds, registry=reg)
        self.batch_size = Histogram("snnet_batch_size", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.queue = Gauge("snnet_queue_depth", "Images waiting for a batch", registry=reg, multiprocess_mode="livesum")
        self.stitch = Gauge("snnet_stitch_id", "Id of the stitch that ran the last batch", registry=reg, multiprocess_mode="liveall")
        self.pinned = Gauge("snnet_stitch_pinned", "1 when the stitch is pinned, 0 when chosen automatically", registry=reg,
                            multiprocess_mode="liveall")
        self.switches = Counter("snnet_stitch_switches", "Batches served by another stitch than the batch before", registry=reg)
        self.slowdown = Gauge("snnet_latency_table_slowdown", "Measured batch time over the latency table's", registry=reg,
                              multiprocess_mode="liveall")

    def render(self) -> bytes:
        return generate_latest(self.registry)


# =============================================================================== the service


@dataclass
class _Job:
    x: torch.Tensor  # (k, C, H, W)
    arrived: float  # time.perf_counter() when the request arrived
    future: asyncio.Future


@dataclass(frozen=True)
class BatchResult:
    """What one request gets back from its batch."""

    probs: torch.Tensor  # (k, classes)
    decision: Decision
    batch_id: int
    batch_size: int
    compute_ms: float


class Batcher:
    """Dynamic batching with a bounded queue; batches run one at a time on one worker thread."""

    def __init__(self, service: "Service") -> None:
        self.service = service
        self.config = service.config
        self.jobs: deque[_Job] = deque()
        self.waiting = 0  # images queued, not yet in a batch
        self.reading = 0  # requests admitted whose images are not counted yet (being read or parsed)
        self.decoding = 0  # images of admitted requests being decoded, or waiting to be
        self.batches = 0
        self.recent: deque[tuple[float, float]] = deque(maxlen=2000)  # (finished at, end-to-end ms)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        # torch's thread count is per calling thread: set it in the one thread that runs the model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-model",
                                            initializer=torch.set_num_threads, initargs=(service.config.threads,))
        # One decoding thread: decoding holds the GIL much of the time, and more threads only
        # contend with the event loop and the model thread (under overload, a pool of 40 threads
        # decoding at once slowed the whole server until the backlog could not drain).
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-decode",
                                          initializer=torch.set_num_threads, initargs=(1,))

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="snnet-batcher")

    def check_room(self, images: int) -> None:
        """:class:`Rejected` (503 with Retry-After) when ``images`` more would overfill the server:
        images queued, being decoded, and requests still being read (one image each) all count."""
        held = self.waiting + self.decoding + self.reading
        if self._closing or held + images > self.config.max_queue:
            raise Rejected(503, f"server is at capacity ({held} images held, limit {self.config.max_queue}): retry later",
                           "queue_full", {"Retry-After": str(self.retry_after())})

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Admit a request before its body is read (refused at once when the server is full)."""
        self.check_room(1)
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1

    @contextlib.contextmanager
    def reserve(self, images: int) -> Iterator[None]:
        """Hold room for a request's images while they are decoded, so that a backlog waits as
        bounded images, not as an unbounded pile of requests in front of the decoder."""
        self.check_room(images)
        self.decoding += images
        try:
            yield
        finally:
            self.decoding -= images

    def retry_after(self) -> int:
        """Seconds until the queue should have drained, at the current stitch's speed (at least 1)."""
        c, ctl = self.config, self.service.controller
        stitch = ctl.current.id
        per_batch = ctl.table.predict(stitch, c.max_batch) * ctl.slowdown if stitch in ctl.table else 100.0
        return max(1, math.ceil(self.waiting / c.max_batch * per_batch / 1000))

    def submit(self, x: torch.Tensor, arrived: float) -> asyncio.Future:
        """Queue a request's decoded images (their room was held by :meth:`reserve`)."""
        job = _Job(x, arrived, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.waiting += len(x)
        self.service.metrics.queue.set(self.waiting)
        assert self._wake is not None
        self._wake.set()
        return job.future

    def _recent_ms(self, now: float, window_s: float = 2.0) -> list[float]:
        return [ms for t, ms in self.recent if now - t <= window_s]

    async def _next_batch(self) -> list[_Job]:
        """Wait for a first request, then up to max_wait_ms (from its arrival) for the batch to fill."""
        assert self._wake is not None
        c = self.config
        while not self.jobs:
            if self._closing:
                return []
            self._wake.clear()
            await self._wake.wait()
        deadline = self.jobs[0].arrived + c.max_wait_ms / 1e3
        while self.waiting < c.max_batch and not self._closing and (left := deadline - time.perf_counter()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, n = [], 0
        while self.jobs and n + len(self.jobs[0].x) <= c.max_batch:  # whole requests, in arrival order
            job = self.jobs.popleft()
            if job.future.done():  # the client went away: nothing to answer
                self.waiting -= len(job.x)
                continue
            batch.append(job)
            n += len(job.x)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        svc, ctl, m = self.service, self.service.controller, self.service.metrics
        while True:
            batch = await self._next_batch()
            if not batch:
                if self._closing and not self.jobs:
                    return
                continue
            now = time.perf_counter()
            n = sum(len(j.x) for j in batch)
            decision = ctl.decide(self.waiting, (now - batch[0].arrived) * 1e3, self._recent_ms(now))
            if decision.switched:  # the latencies seen so far were another stitch's
                self.recent.clear()
            self.waiting -= n
            m.queue.set(self.waiting)
            x = torch.cat([j.x for j in batch]) if len(batch) > 1 else batch[0].x
            t0 = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._executor, svc.forward, decision.stitch, x)
            except Exception as e:  # noqa: BLE001 - answer every waiting request, keep serving
                log.exception("batch failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            done = time.perf_counter()
            compute_ms = (done - t0) * 1e3
            self.batches += 1
            ctl.observe_batch(decision.stitch, n, compute_ms)
            m.batch_seconds.observe(compute_ms / 1e3)
            m.batch_size.observe(n)
            m.stitch.set(decision.stitch)
            m.pinned.set(1 if decision.pinned else 0)
            m.slowdown.set(ctl.slowdown)
            m.switches.inc(decision.switched)
            m.images.labels(decision.name).inc(n)
            start = 0
            for j in batch:
                k = len(j.x)
                self.recent.append((done, (done - j.arrived) * 1e3))
                if not j.future.done():
                    j.future.set_result(BatchResult(probs[start:start + k], decision, self.batches, n, compute_ms))
                start += k

    async def close(self) -> None:
        """Finish every queued request, then stop (SIGTERM: uvicorn stops accepting, then this)."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        self.decoder.shutdown(wait=True)


class Service:
    """The network, its ladder, latency table and controller, the batcher and the metrics."""

    def __init__(self, config: ServeConfig, net: StitchedNet, rows: Sequence[dict[str, Any]]) -> None:
        self.config = config
        self.net = net.eval()
        self.rows = {int(r["id"]): r for r in rows}
        self.input_size = tuple(net.input_size)
        self.preprocess = Preprocess(net.anchors[0].data_config, self.input_size)
        table = LatencyTable.from_rows(rows)
        self.controller = StitchController(ladder(rows), table, ControllerConfig(config.slo_ms, config.max_batch, up_after=config.up_after))
        if config.stitch not in (None, "auto"):
            self.pin(config.stitch)
        self.metrics = Metrics()
        self.batcher = Batcher(self)

    @classmethod
    def load(cls, config: ServeConfig, say: Callable[[str], Any] = log.info) -> "Service":
        """Load the network and results; profile at start the stitches to serve that the results
        hold no latency table for (at batch sizes 1, 2, 4, ... up to ``max_batch``), saying so."""
        torch.set_num_threads(config.threads)
        net = StitchedNet.from_pretrained(config.model).eval()
        rows = [c.to_dict() for c in net.costs()]
        if config.results is not None:
            rows = merge_rows(rows, read_rows(config.results), "the results")
        table = LatencyTable.from_rows(rows)
        todo = [r.id for r in ladder(rows) if r.id not in table or len(table.batch_sizes(r.id)) < 2]
        if todo:
            sizes = sorted({min(2 ** k, config.max_batch) for k in range(int(math.log2(config.max_batch)) + 2)})
            say(f"profiling {len(todo)} stitches at batch sizes {sizes} ({config.threads} threads): "
                f"{config.results or 'no results file'} has no latency_by_batch for them (`snnet profile --batch-sizes` writes it)")
            measured, settings = profile(net, batch_size=1, warmup=3, repeats=config.profile_repeats, device="cpu",
                                         threads=config.threads, stitches=todo, progress=False, batch_sizes=sizes)
            extra = [dict(r.to_dict(), profile=settings.to_dict()) for r in measured]
            rows = merge_rows(rows, extra, "the profile")
        return cls(config, net, rows)

    def rung(self, key: int | str) -> Rung:
        """Any stitch of the network as a :class:`Rung` (raises StitchNotFoundError)."""
        s = self.net.stitch(int(key) if isinstance(key, str) and key.strip().isdigit() else key)
        r = self.rows[s.id]
        return Rung(s.id, s.name, int(r["flops"]), r.get("acc1"))

    def pin(self, key: int | str) -> None:
        self.controller.pin(self.rung(key))

    def forward(self, stitch: int, x: torch.Tensor) -> torch.Tensor:
        """Run one batch on one stitch (on the worker thread: the only place that selects)."""
        with torch.inference_mode():
            self.net.select(stitch)
            return self.net(x).float().softmax(-1)

    def decode(self, blobs: Sequence[bytes]) -> torch.Tensor:
        c = self.config
        return self.preprocess([decode_image(b, self.input_size, resize=c.resize, max_pixels=c.max_pixels) for b in blobs])


# =============================================================================== the app


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
