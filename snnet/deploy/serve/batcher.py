"""A server process's side of batching: room in its input ring, jobs out, results back.

The batching loop and the model run in the model process (:mod:`.engine`); each server process
(one per uvicorn worker) owns a :class:`Batcher`:

* the **input ring**: ``max_queue`` images of the network's input, float32, in a file in
  ``/dev/shm`` mapped by both processes (unlinked as soon as the model process has mapped it, so
  nothing is left behind whatever happens). A request's decoded images are written straight into
  free places (:meth:`Batcher.reserve`): one run of them when there is one long enough, else the
  first free places wherever they are, in runs the model process reads in order; the room is held
  from decoding until the request's batch has run, and a request that finds fewer free places than
  it has images gets 503 at once, with Retry-After;
* a **jobs connection**: one small message per request out, one ``done`` message per batch back,
  read on the event loop as soon as it arrives (``loop.add_reader``), which resolves each
  request's future with its probabilities and the batch's details (:class:`BatchResult`);
* a **control connection**, used from a thread so the event loop never waits on it: the policy,
  pin and auto (the model process answers those at once, from a thread of its own).

Room is counted in images, not requests, and only once a request's body has arrived: a client
that uploads slowly holds nothing (issue 25).
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from ..controller import Decision
from .engine import BatchInfo, EngineInfo, Segments, joining, open_ring, recv, unpack_results, waiting
from .rejected import Rejected

__all__ = ["BatchResult", "Batcher", "CONTROL_TIMEOUT_S", "TELL_INLINE_S"]

# Requests run in the server process (.inline) reach the model process's policy in one message at
# most this often, or just before the next job: a message per request would wake the model
# process at every lone request (tens of µs of CPU each side, on a machine whose other core it shares).
TELL_INLINE_S = 0.05

# How long a control question (GET/PUT /stitch, /health's state) waits for the model process: its control thread
# answers at once, so a longer wait means the process is stopped or hung (the client used to wait for ever).
CONTROL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BatchResult:
    """What one request gets back from its batch."""

    probs: np.ndarray  # (k, classes)
    info: BatchInfo

    @property
    def decision(self) -> Decision:
        return self.info.decision


def _shm_folder() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class Batcher:
    """One server process's input ring and connections to the model process."""

    def __init__(self, connect: Callable[..., Connection], info: EngineInfo, max_queue: int,
                 on_batch: Callable[[BatchInfo, int], None] = lambda info, images: None) -> None:
        self.info = info
        self.capacity = max_queue
        self.on_batch = on_batch  # metrics: called once per batch this process had requests in
        fd, path = tempfile.mkstemp(prefix="snnet-ring-", dir=_shm_folder())
        os.close(fd)
        try:
            self._buf, self.ring, self.state = open_ring(path, max_queue, info.input_size)
            self.conn = connect("jobs", path, max_queue)
            with joining(self.conn, "mapping this server process's input ring"):
                self.conn.recv()  # "attached": the model process has mapped the ring
        finally:
            os.unlink(path)
        self._waiting = waiting(self.conn)
        # jobs go out without blocking the event loop (MSG_DONTWAIT on a copy of the descriptor: reads stay blocking);
        # what the socket does not take waits here, in order, until the model process reads again. Bounded by the ring:
        # every job not yet answered holds at least one image of it
        self._sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        self._out = bytearray()
        self._writing = False  # a loop writer sends _out as the socket takes it
        self._control = connect("control")
        self._control_lock = threading.Lock()
        self._unanswered = 0  # control questions given up on (CONTROL_TIMEOUT_S): their late answers are read and dropped
        self._used = bytearray(max_queue)  # 1 where an image of a request not yet answered is held
        self.held = 0
        self._pending: dict[int, tuple[asyncio.Future, Segments, int]] = {}  # job id -> (future, its places, images)
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last: BatchInfo | None = None  # the latest batch this process heard of
        self.closing = False
        self.gone = False  # the model process's connection ended
        self.unanswered = 0  # requests sent that the model process had not answered when close() gave up on them
        self._ran_inline: list[tuple[int, float, float]] = []  # (images, arrived, latency ms) not yet told
        self._state: asyncio.Future | None = None  # the state asked of the model process, shared by who waits for it

    # ------------------------------------------------------------------ room
    def reserve(self, images: int) -> Segments:
        """``images`` free places in the ring, now held, as the runs they make (:data:`~.engine.Segments`): the first
        run long enough, else the first free places wherever they are. Only a ring with fewer free places than
        ``images`` refuses (it needed one run as long as the request: a fragmented ring answered 503 with room left):
        :class:`Rejected`, 503 with Retry-After."""
        if self.closing or self.held + images > self.capacity:
            raise Rejected(503, f"server is at capacity ({self.held} images held, limit {self.capacity}): retry later",
                           "queue_full", {"Retry-After": str(self.retry_after())})
        at = self._used.find(bytes(images))
        segments = ((at, images),) if at >= 0 else self._scattered(images)
        for at, k in segments:
            self._used[at:at + k] = b"\x01" * k
        self.held += images
        return segments

    def _scattered(self, images: int) -> Segments:
        """The first ``images`` free places, run by run (a loop a run, not an image); the ring has that many free."""
        used, runs, at = self._used, [], 0
        while images:
            at = used.find(0, at)  # the next free place
            end = used.find(1, at, at + images)  # where its run ends, if before the request does
            k = (end if end >= 0 else at + images) - at
            runs.append((at, k))
            images -= k
            at += k
        return tuple(runs)

    def release(self, segments: Segments) -> None:
        for at, k in segments:
            self._used[at:at + k] = bytes(k)
            self.held -= k

    def retry_after(self) -> int:
        """Seconds until what is held should have run, at the speed of the last batch (at least 1)."""
        last = self.last
        if last is None or last.size == 0:
            return 1
        return max(1, math.ceil((self.held + last.queue) / last.size * last.compute_ms / 1000))

    # ------------------------------------------------------------------ jobs
    def start(self) -> None:
        """Read results on the running event loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._on_results)
        # libuv (uvloop) makes a polled descriptor non-blocking; a result larger than one read
        # (4 images x 1000 classes) would then come back as BlockingIOError halfway through
        os.set_blocking(self.conn.fileno(), True)

    def submit(self, segments: Segments, images: int, arrived: float) -> asyncio.Future:
        """Send the model process a request whose images are in the ring's places ``segments`` (from
        :meth:`reserve`); the future gets its :class:`BatchResult` (or the model's error, as a
        RuntimeError). The room is released when the batch has run, whatever the caller does meanwhile."""
        assert self._loop is not None, "Batcher.start() first"
        job_id = self._next_id
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[job_id] = (future, segments, images)
        if self._ran_inline:
            self._tell_inline()  # the policy sees the earlier arrivals before this one
        try:
            self._send(("job", job_id, segments, images, arrived))
        except OSError as e:
            del self._pending[job_id]
            raise Rejected(503, f"the model process is gone ({e.__class__.__name__}): the server is shutting down or broken",
                           "model_gone") from e
        return future

    @property
    def idle(self) -> bool:
        """Nothing of this process's waits for the model process, and the model process has nothing
        queued or running from any server process (as it last published): a lone request may run
        here (:mod:`.inline`)."""
        return not self._pending and not self.closing and not self.gone and not self.state.busy

    def observe_inline(self, images: int, arrived: float, latency_ms: float) -> None:
        """A request this process ran itself: the model process's policy sees it as a batch's, told
        within TELL_INLINE_S or with the next job, whichever is first."""
        if not self._ran_inline and self._loop is not None:
            self._loop.call_later(TELL_INLINE_S, self._tell_inline)
        self._ran_inline.append((images, arrived, latency_ms))

    def _tell_inline(self) -> None:
        ran, self._ran_inline = self._ran_inline, []
        # dropped while jobs wait to be sent: a model process that stopped reading would have them pile up without bound
        if ran and not (self.gone or self.conn.closed or self._out):
            try:
                self._send(("inline", ran))
            except OSError:
                pass  # gone: the next read finds out

    def _send(self, message: tuple) -> None:
        """Send ``message`` to the model process without blocking the event loop: what the socket does not take now
        waits in ``_out`` (after anything already waiting) and goes as the model process reads. OSError: it is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._out += struct.pack("!i", len(data)) + data  # Connection.send_bytes's framing: the model process's recv reads it
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                del self._out[:self._sock.send(self._out, socket.MSG_DONTWAIT)]
        except BlockingIOError:  # the model process is not reading now: the loop sends the rest when it can
            if not self._writing:
                assert self._loop is not None
                self._loop.add_writer(self._sock.fileno(), self._flush)
                # the copy shares the descriptor's blocking flag, which libuv just cleared: reads stay whole (start())
                os.set_blocking(self._sock.fileno(), True)
                self._writing = True
            return
        except OSError:  # gone: nothing waiting will be read
            self._out.clear()
            if not self._writing:
                raise  # sending from submit: its request is refused
            # found while the loop sent the rest: the reader fails what waits
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            assert self._loop is not None
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False

    def _on_results(self) -> None:
        try:
            while self._waiting():
                kind, wire, *rest = recv(self.conn)
                info = BatchInfo.from_wire(wire)
                if kind == "done":
                    self.last = info  # a failed forward's time (often at once) says nothing of how soon the ring drains
                    results: list[tuple[int, Any]] = unpack_results(*rest)
                else:  # "failed": the model's error for every request of the batch
                    jobs, error = rest
                    results = [(job_id, error) for job_id, _, _ in jobs]
                images = 0
                for job_id, out in results:
                    future, segments, k = self._pending.pop(job_id)
                    self.release(segments)
                    images += k
                    if future.done():
                        continue
                    if isinstance(out, str):
                        future.set_exception(RuntimeError(out))
                    else:
                        future.set_result(BatchResult(out, info))
                if kind == "done":  # a failed batch classified nothing: not in snnet_images_total, its time not a batch's
                    self.on_batch(info, images)
        except (EOFError, OSError):  # the model process is gone: nothing queued will be answered
            self.gone = True
            assert self._loop is not None
            self._loop.remove_reader(self.conn.fileno())
            self._stop_writing()
            self._out.clear()
            for future, segments, _ in self._pending.values():
                self.release(segments)
                if not future.done():  # a 503 as for a request sent after it went, not the 500 of a batch the model failed
                    future.set_exception(Rejected(503, "the model process exited before answering: the server is shutting "
                                                       "down or broken", "model_gone"))
            self._pending.clear()

    # ------------------------------------------------------------------ control
    def control(self, op: str, arg: Any = None) -> Any:
        """Ask the model process (blocking: call it from a thread), waiting CONTROL_TIMEOUT_S at most. Returns its
        answer, or raises :class:`Rejected`: 404/400 with the model process's one-line reason, 503 when it is gone
        or does not answer in time."""
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        hung = f"the model process is not answering (nothing within {CONTROL_TIMEOUT_S:g} s): it is hung or overloaded"
        not_answering = Rejected(503, f"{hung}; retry later", "model_gone")
        try:
            if not self._control_lock.acquire(timeout=CONTROL_TIMEOUT_S):  # another question waits on it
                raise not_answering
            try:
                while self._unanswered:  # answers come in the order asked: first those of questions given up on
                    if not self._control.poll(max(0.0, deadline - time.monotonic())):
                        raise not_answering
                    self._control.recv()
                    self._unanswered -= 1
                self._control.send((op, arg))
                self._unanswered += 1
                if not self._control.poll(max(0.0, deadline - time.monotonic())):
                    if op in ("state", "policy"):  # questions, not changes
                        raise not_answering
                    # sent, not refused: a change (a pin) still takes effect if the model process comes back to it
                    raise Rejected(503, f"{hung}; the change was sent and takes effect if it resumes: read GET /stitch "
                                        "before sending it again", "model_gone")
                ok, payload = self._control.recv()
                self._unanswered -= 1
            finally:
                self._control_lock.release()
        except (OSError, EOFError) as e:
            raise Rejected(503, f"the model process does not answer ({type(e).__name__}): the server is shutting down or broken",
                           "model_gone") from e
        if ok:
            return payload
        kind, reason = payload
        raise Rejected(404 if kind == "not_found" else 400, reason, "bad_request")

    async def ask(self, op: str, arg: Any = None) -> Any:
        return await asyncio.to_thread(self.control, op, arg)

    def model_state(self) -> asyncio.Future:
        """The model process's state, asked once however many wait for it: each health probe asking anew left a
        thread blocked on a stopped model process, one a probe, until the default executor (six threads here)
        was full and every other call made in a thread waited behind them."""
        if self._state is None or self._state.done():
            self._state = asyncio.ensure_future(self.ask("state"))
            self._state.add_done_callback(lambda f: f.cancelled() or f.exception())  # read by someone, or dropped
        return self._state

    # ------------------------------------------------------------------ shutdown
    async def close(self, timeout_s: float, gave_up: Callable[[], Any] | None = None) -> None:
        """Refuse new requests, wait up to ``timeout_s`` for every request sent to be answered (the server's
        graceful shutdown: a model process that hangs holds the shutdown no longer), then disconnect. Requests
        whose handler is gone (uvicorn cancels them at its own graceful bound) are not waited for: nobody reads
        their answer, and the shutdown had already waited that bound once for them. ``gave_up`` is called when
        requests were left unanswered, before the disconnect (the model process reads it once it runs again)."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        while any(not future.done() for future, _, _ in self._pending.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.unanswered = len(self._pending)
        if self.unanswered and gave_up is not None:
            gave_up()
        if self._loop is not None and not self.conn.closed:
            self._loop.remove_reader(self.conn.fileno())
            self._stop_writing()
        for conn in (self.conn, self._control, self._sock):
            conn.close()
        self.ring = np.empty((0, *self.info.input_size), np.float32)  # drop the view before the map
        try:
            self._buf.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with the process
            pass
