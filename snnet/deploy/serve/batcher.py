"""Dynamic batching: requests queue in a bounded queue, batches run one at a time on one worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from ..controller import Decision
from .config import log
from .rejected import Rejected

if TYPE_CHECKING:
    from .service import Service

__all__ = ["BatchResult", "Batcher"]


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

