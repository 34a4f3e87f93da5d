"""The model process: the network, its stitch policy and the batching loop, apart from HTTP.

Why a process of its own: a small network's forward is much Python (one call per module), and
so are HTTP parsing, multipart parsing and decoding. In one process they take turns on the GIL,
and the server answered fewer images a second than the model alone could run (issue 20). Here
the model process does nothing but batches, on its own core, and the server processes
(:mod:`.batcher`, one per uvicorn worker) do everything else:

* a server process decodes and normalises a request's images straight into its **input ring**, a
  shared-memory array of ``max_queue`` images it made, and sends the model process one small
  message: which places of the ring hold its images (:data:`Segments`: one run, or several when
  the ring is fragmented, read in order), how many, when the request arrived (``("job", ...)``);
* the **batching loop** here takes every message waiting, from every server process, and runs the
  next batch: whole requests in arrival order, up to ``max_batch`` images, on the stitch the
  policy (:func:`~snnet.deploy.controller.make_policy`) names for it from the queue and the recent
  latencies. It runs as soon as the model is free (``max_wait_ms`` 0) or waits that long after
  the first request for the batch to fill. Each request's probabilities go back as a ``done``
  message with the batch's details; batches run one after another, each wholly on one stitch,
  so switching never drops or reorders a request;
* **control** (the policy, pin, unpin) is answered by a thread of its own at once, not after the
  batch in flight: a pin takes effect from the next batch, for every server process;
* the **state** it publishes in every ring's last bytes (:class:`RingState`): the stitch the next
  batch would get (pinned or the policy's current rung) and whether images are queued or in the
  batch running. A server process reads it to run a lone request itself while this process has
  nothing to do (:mod:`.inline`), on the very stitch this process would have used, and tells it
  afterwards (``("inline", [...])``, a few such requests at once: their arrivals and latencies
  reach the policy as a batch's would).

The process starts with :class:`EngineProcess` (a fresh interpreter: no inherited threads), loads the network, profiles the stitches the results give no latency table for, then
listens on a Unix socket for server processes (:class:`multiprocessing.connection.Listener`, with
an authentication key). It ignores SIGINT and SIGTERM (the servers drain first, then its owner
closes it) and exits when its owner says so or goes away.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import mmap
import os
import pickle
import secrets
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge, wait
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ...errors import ServeError, SnnetError, StitchNotFoundError
from ...results import Row
from ..controller import RECENT_S, ControllerConfig, Decision, LatencyTable, StitchController, Waiting, ladder, make_policy
from ..heap import freeze_heap
from .config import ServeConfig

__all__ = ["BatchInfo", "CLOSE_S", "EngineInfo", "EngineProcess", "JOIN_TIMEOUT_S", "RingState", "Segments", "connect", "joining",
           "open_ring", "pack_results", "probabilities", "unpack_results", "waiting"]

CLOSE_S = 60.0  # how long closing waits, unless told, for the model process to finish what is queued (then it is killed)
# How long a server process joining the model process waits for each of its answers (the handshake, its ring mapped, its
# info): its accept and control threads answer at once, so a longer wait means it is stopped or hung (see joining).
JOIN_TIMEOUT_S = 5.0

# The places of a server process's ring that hold one request's images: runs of (offset, images), in the request's order.
# One run unless the ring is fragmented (requests answered leave holes between those still held): a request that fits in
# the free places is not refused for want of a run as long as itself.
Segments = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class EngineInfo:
    """What a server process learns from the model process when it connects."""

    rows: list[Row]  # every stitch: id, name, flops, acc1, latency table...
    input_size: tuple[int, int, int]
    data_config: dict[str, Any]  # the first anchor's: mean, std, interpolation, crop (how images are read)
    pid: int


@dataclass(frozen=True)
class BatchInfo:
    """One batch, as the server processes whose requests were in it learn of it."""

    batch_id: int
    size: int  # images
    compute_ms: float
    decision: Decision
    queue: int  # images still waiting in the model process after this batch was taken
    slowdown: float
    lead: bool  # this server process records the batch's own metrics (each batch is counted once)

    # On the wire a batch's details are a plain tuple: pickling two dataclasses (and multiprocessing's
    # own pickler, which Connection.send uses) cost ~20 us a batch on each side, more than the
    # rest of the message handling together (issue 20: the model process is the server's bottleneck).
    def wire(self) -> tuple:
        d = self.decision
        return (self.batch_id, self.size, self.compute_ms, (d.stitch, d.name, d.predicted_ms, d.switched, d.pinned, d.reason),
                self.queue, self.slowdown, self.lead)

    @classmethod
    def from_wire(cls, t: tuple) -> "BatchInfo":
        batch_id, size, compute_ms, d, queue, slowdown, lead = t
        return cls(batch_id, size, compute_ms, Decision(*d), queue, slowdown, lead)


def probabilities(net: Any, stitch: int, x: Any, graph: Any = None) -> np.ndarray:
    """The served forward, wherever it runs (a batch in the model process, a lone request in a server
    process): select the stitch (O(1)), run its route, softmax, as float32 numpy. ``graph``: the
    stitch's route traced into a graph (:class:`~.inline.RouteGraphs`), run instead of the network."""
    import torch

    with torch.inference_mode():
        if graph is None:
            net.select(stitch)
            graph = net
        return graph(x).float().softmax(-1).numpy()


def send(conn: Connection, message: tuple) -> None:
    """A job or a batch's results, as the standard pickle of plain values (Connection.recv reads it too)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def waiting(conn: Connection) -> Callable[[], bool]:
    """Whether a message from ``conn`` is waiting, asked without blocking. ``Connection.poll`` builds
    and tears down a selector at every call (~5-15 us); this keeps one poll object per connection."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return lambda: bool(poller.poll(0))


def pack_results(probs: np.ndarray, jobs: Sequence[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], bytes, int]:
    """A batch's probabilities for some of its requests as one raw float32 block: ``(job id, row, images)``
    per request, the bytes and the number of classes (an array pickled costs ~7 us to dump and ~5 to
    load a batch; its bytes ~1)."""
    rows = [probs[start:start + k] for _, start, k in jobs]
    block = rows[0] if len(rows) == 1 else np.concatenate(rows)
    at, index = 0, []
    for job_id, _, k in jobs:
        index.append((job_id, at, k))
        at += k
    return index, np.ascontiguousarray(block, np.float32).tobytes(), int(probs.shape[-1])


def unpack_results(index: Sequence[tuple[int, int, int]], block: bytes, classes: int) -> list[tuple[int, np.ndarray]]:
    """:func:`pack_results` read back: ``(job id, its (images, classes) probabilities)`` per request."""
    probs = np.frombuffer(block, np.float32).reshape(-1, classes)
    return [(job_id, probs[at:at + k]) for job_id, at, k in index]


class RingState:
    """What the two processes publish to each other in the last bytes of a server process's ring:
    int64 words, each aligned (a reader never sees half of one).

    * the model process writes (under its policy lock) the first cache line: the stitch of its next
      batch, whether it is pinned, whether it is busy; the server process reads them (:mod:`.inline`);
    * the server process writes the second: the requests it has read but not yet put in the ring,
      the oldest one's arrival (ns of ``time.perf_counter``, the same clock in every process), its
      mean work per request (µs) and mean images per request (x1000) (:mod:`.upstream`); the model
      process reads them before each batch (:meth:`upstream`), so that its policy plans on the
      whole wait. The words are written one by one: a reader may see a count and an arrival of
      consecutive updates, which is as good as either for planning."""

    STITCH, PINNED, BUSY = range(3)
    UP_REQUESTS, UP_OLDEST_NS, UP_WORK_US, UP_IMAGES_MILLI = range(8, 12)
    WORDS = 16  # two cache lines: one each process writes

    def __init__(self, words: np.ndarray) -> None:
        self.words = words

    def publish(self, stitch: int, pinned: bool, busy: bool) -> None:
        w = self.words
        w[self.STITCH], w[self.PINNED], w[self.BUSY] = stitch, pinned, busy

    def publish_upstream(self, requests: int, oldest: float | None, work_ms: float, images: float) -> None:
        w = self.words
        w[self.UP_OLDEST_NS] = 0 if oldest is None else int(oldest * 1e9)
        w[self.UP_WORK_US], w[self.UP_IMAGES_MILLI] = int(work_ms * 1e3), int(images * 1e3)
        w[self.UP_REQUESTS] = requests

    def upstream(self) -> Waiting | None:
        """The server process's requests not yet in the ring, or None when there are none."""
        w = self.words
        n = int(w[self.UP_REQUESTS])
        if n <= 0:
            return None
        oldest = int(w[self.UP_OLDEST_NS])
        return Waiting(n, oldest / 1e9 if oldest else None, int(w[self.UP_WORK_US]) / 1e3, max(int(w[self.UP_IMAGES_MILLI]) / 1e3, 1.0))

    @property
    def stitch(self) -> int:
        """The stitch the model process's next batch would get: pinned, or the policy's current rung."""
        return int(self.words[self.STITCH])

    @property
    def pinned(self) -> bool:
        return bool(self.words[self.PINNED])

    @property
    def busy(self) -> bool:
        """Whether the model process has images queued or a batch running (from any server process)."""
        return bool(self.words[self.BUSY])


def open_ring(path: str, capacity: int, input_size: Sequence[int]) -> tuple[mmap.mmap, np.ndarray, RingState]:
    """The input ring in file ``path`` (in /dev/shm where there is one): ``capacity`` images of
    float32 ``input_size``, mapped shared, as a numpy array; and after them the model process's
    published :class:`RingState`."""
    shape = (capacity, *(int(v) for v in input_size))
    images = -(-int(np.prod(shape)) * 4 // 64) * 64  # the state starts on a 64-byte boundary
    nbytes = images + RingState.WORDS * 8
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < nbytes:
            os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return (buf, np.ndarray(shape, np.float32, buffer=buf),
            RingState(np.ndarray((RingState.WORDS,), np.int64, buffer=buf, offset=images)))


@dataclass(eq=False)  # compared and hashed by identity: one per connection
class _Front:
    """A server process connected to the model process: its connection and its input ring."""

    conn: Connection
    buf: mmap.mmap
    ring: np.ndarray
    state: RingState
    waiting: Callable[[], bool] = lambda: False


@dataclass
class _Job:
    front: _Front
    job_id: int
    segments: Segments  # where its images are in its front's ring, in order
    images: int
    arrived: float  # time.perf_counter() of the server process (CLOCK_MONOTONIC, the same for all processes)


@dataclass
class _Engine:
    """The network and the policy, and the batching loop over every server process's jobs."""

    config: ServeConfig
    net: Any  # StitchedNet
    rows: list[Row]
    policy: StitchController
    jobs: deque[_Job] = field(default_factory=deque)
    fronts: list[_Front] = field(default_factory=list)
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4000))  # (finished, end-to-end ms)
    batches: int = 0
    inline: int = 0  # requests the server processes ran themselves (and told this process of)
    running: int = 0  # images in the batch running now
    busy: bool = False  # images queued or running, as last published
    published: tuple[int, bool, bool] | None = None  # (stitch, pinned, busy) as last written to every ring
    batch_stitch: int | None = None  # the stitch of the last batch run (snnet_stitch_switches counts batches, not decisions)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the policy: the batching loop and control share it
    selector: selectors.BaseSelector | None = None  # what the batching loop waits on (set by serve)
    mark: str | None = None  # where a server process that gave up on requests says so (tell_unanswered; set by serve)

    # ------------------------------------------------------------------ start
    @classmethod
    def load(cls, config: ServeConfig, say: Callable[[str], Any]) -> "_Engine":
        """Load the network and results; profile at start the stitches to serve that the results
        hold no latency table for (at batch sizes 1, 2, 4, ... up to ``max_batch``), saying so."""
        import torch

        from ...model import StitchedNet
        from ...results import merge_rows, read_rows
        from ..profiling import profile

        torch.set_num_threads(config.threads)
        net = StitchedNet.from_pretrained(config.model).eval()
        if config.stitch not in (None, "auto"):
            net.stitch(config.stitch)  # a --stitch the network lacks fails before minutes of profiling, not after
        rows = net.costs()
        if config.results is not None:
            rows = merge_rows(rows, read_rows(config.results), "the results")
        table = LatencyTable.from_rows(rows)
        todo = [r.id for r in ladder(rows) if r.id not in table or len(table.batch_sizes(r.id)) < 2]
        if todo:
            sizes = sorted({min(2 ** k, config.max_batch) for k in range(int(math.log2(config.max_batch)) + 2)})
            say(f"profiling {len(todo)} stitches at batch sizes {sizes} ({config.threads} threads): "
                f"{config.results or 'no results file'} has no latency_by_batch for them (`snnet profile --batch-sizes` writes it)")
            # threads=None: the --threads set above, as the batches will run (profile's own --threads check, at most this
            # machine's CPUs, refused after loading a setting the server takes with a latency table in the results)
            measured, settings = profile(net, batch_size=1, warmup=3, repeats=config.profile_repeats, device="cpu",
                                         threads=None, stitches=todo, progress=False, batch_sizes=sizes)
            rows = merge_rows(rows, measured, "the profile")
        engine = cls(config, net, rows, _policy(config.policy, rows, config))
        if config.stitch not in (None, "auto"):
            engine.policy.pin(engine.rung(config.stitch))
        return engine

    def info(self) -> EngineInfo:
        net = self.net
        return EngineInfo(self.rows, tuple(int(v) for v in net.input_size), dict(net.anchors[0].data_config), os.getpid())

    def rung(self, key: int | str) -> Row:
        """Any stitch of the network: its row (raises StitchNotFoundError)."""
        s = self.net.stitch(key)  # an id given as text ("3") is read by the space
        return next(r for r in self.rows if r.id == s.id)

    # ------------------------------------------------------------------ control (its own thread)
    def control(self, op: str, arg: Any) -> Any:
        """``policy`` (what GET /stitch shows), ``pin`` a stitch, ``auto`` (optionally with another
        policy name), ``state`` (what GET /health shows) or ``info`` (:class:`EngineInfo`)."""
        if op == "info":
            return self.info()
        with self.lock:
            if op == "pin":
                self.policy.pin(self.rung(arg))
            elif op == "auto":
                if arg is not None and arg != self.policy.name:
                    old = self.policy
                    self.policy = _policy(arg, self.rows, self.config)
                    self.policy.slowdown = old.slowdown
                else:
                    self.policy.unpin()
            elif op == "state":
                return self.state()
            elif op != "policy":
                raise ServeError(f"unknown control operation {op!r}")
            answer = self.policy.policy()
        if op in ("pin", "auto"):
            self.publish(control=True)  # before the answer: a lone request sent after it runs on the new stitch
        return answer

    def state(self) -> dict[str, Any]:
        p = self.policy
        return {"stitch": p.current.name, "mode": "pinned" if p.pinned else "auto", "policy": p.name,
                "queue": sum(j.images for j in self.jobs), "batches": self.batches, "inline": self.inline, "model_pid": os.getpid(),
                "model_gc_frozen": gc.get_freeze_count()}

    def publish(self, fronts: Sequence[_Front] | None = None, *, control: bool = False) -> None:
        """Tell every server process (or ``fronts``) the stitch of the next batch and whether
        anything is queued or running, when that changed (under load nothing does from one batch
        to the next: a compare a batch). The batching loop counts the queue; the control thread
        (``control``, after a pin) repeats the loop's last count rather than read the queue the
        loop is changing."""
        if not control:
            self.busy = self.running > 0 or bool(self.jobs)
        with self.lock:
            state = (self.policy.current.id, self.policy.pinned is not None, self.busy)
            if fronts is None:
                if state == self.published:
                    return
                self.published, fronts = state, list(self.fronts)
            for front in fronts:
                front.state.publish(*state)

    # ------------------------------------------------------------------ the batching loop
    def serve(self, listener: Listener, owner: Connection) -> None:
        """Run batches until the owner says ``close`` (then finish what is queued) or goes away."""
        import torch

        torch.set_num_threads(self.config.threads)
        wake_r, wake_w = os.pipe()
        self.mark = _unanswered_mark(os.path.dirname(listener.address))
        arrivals: deque[_Front] = deque()
        threading.Thread(target=self._accept, args=(listener, arrivals, wake_w), daemon=True, name="snnet-accept").start()
        # one poll set for the life of the loop: multiprocessing's wait() builds and fills one at every call
        sel = self.selector = selectors.DefaultSelector()
        sel.register(owner, selectors.EVENT_READ, owner)
        sel.register(wake_r, selectors.EVENT_READ, wake_r)
        closing = False
        c = self.config
        while True:
            if not self.jobs:
                if closing and not wait([f.conn for f in self.fronts], 0):  # nothing queued, nothing on its way
                    return
                timeout: float | None = None
            elif c.max_wait_ms > 0 and sum(j.images for j in self.jobs) < c.max_batch:
                timeout = max(0.0, self.jobs[0].arrived + c.max_wait_ms / 1e3 - time.perf_counter())
            else:
                timeout = 0.0
            for key, _ in sel.select(timeout):
                obj = key.data
                if obj is owner:
                    try:
                        msg = owner.recv()
                    except (EOFError, OSError):  # the owner is gone: nobody will close this process
                        return
                    closing = closing or msg[0] == "close"
                elif obj == wake_r:
                    os.read(wake_r, 4096)
                    while arrivals:
                        front = arrivals.popleft()
                        self.fronts.append(front)
                        sel.register(front.conn, selectors.EVENT_READ, front)
                        self.publish([front])
                else:
                    self._read(obj)
            queued = sum(j.images for j in self.jobs)
            waited = (time.perf_counter() - self.jobs[0].arrived) * 1e3 if self.jobs else 0.0
            if self.jobs and (queued >= c.max_batch or waited >= c.max_wait_ms or closing):
                self._run_batch(torch)

    def _accept(self, listener: Listener, arrivals: deque[_Front], wake_w: int) -> None:
        """Server processes connect here: a ``jobs`` connection (with its input ring) joins the
        batching loop; a ``control`` connection gets a thread that answers it."""
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a client gone mid-handshake, or without the key
                continue
            try:
                kind, *args = conn.recv()
                if kind == "control":
                    threading.Thread(target=self._answer, args=(conn,), daemon=True, name="snnet-control").start()
                    continue
                path, capacity = args
                buf, ring, state = open_ring(path, capacity, self.net.input_size)
                with self.lock:
                    state.publish(self.policy.current.id, self.policy.pinned is not None, True)  # busy until the loop publishes
                conn.send(("attached", os.getpid()))
            except Exception as e:  # noqa: BLE001 - that connection only (its server process gone before its ring was mapped...):
                # a dead accept thread would leave every later connection, control included, unanswered for good
                print(f"snnet model process: a server process's connection failed ({type(e).__name__}: {e})", file=sys.stderr)
                ring = state = buf = None  # a ring mapped for it is unmapped with its last view
                conn.close()
                continue
            arrivals.append(_Front(conn, buf, ring, state, waiting(conn)))
            os.write(wake_w, b"x")

    def _answer(self, conn: Connection) -> None:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError):
                conn.close()
                return
            try:
                reply: tuple[bool, Any] = (True, self.control(op, arg))
            except StitchNotFoundError as e:
                reply = (False, ("not_found", str(e).splitlines()[0]))
            except SnnetError as e:
                reply = (False, ("bad_request", str(e).splitlines()[0]))
            except Exception as e:  # noqa: BLE001 - any other failure is answered too: a silent thread hangs every later control call
                reply = (False, ("bad_request", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            conn.send(reply)

    def _read(self, front: _Front) -> None:
        """Every message waiting from one server process."""
        try:
            jobs = False
            while front.waiting():
                kind, *args = recv(front.conn)
                if kind == "job":
                    job_id, segments, images, arrived = args
                    self.jobs.append(_Job(front, job_id, segments, images, arrived))
                    with self.lock:
                        self.policy.observe_arrival(images, arrived)
                    jobs = True
                elif kind == "inline":
                    self._inline(*args)
            if jobs:
                self.publish()
        except (EOFError, OSError):  # that server process is gone: its requests have nobody to answer
            if self.mark is not None:
                # it left its mark, if it gave up on requests, before it disconnected: this process runs again after that,
                # so the owner's close need not kill it at once (under --workers the model process outlives a SIGHUP's
                # restarted workers, and the mark of one that gave up during the restart killed it at the final shutdown)
                try:
                    os.unlink(self.mark)
                except OSError:
                    pass  # none: it answered or left without requests
            self.jobs = deque(j for j in self.jobs if j.front is not front)
            if self.selector is not None:
                self.selector.unregister(front.conn)
            front.conn.close()
            self.fronts.remove(front)
            self.publish()  # its requests were all that was queued: the others' lone requests may run in their processes again

    def _decide(self, waiting: int, oldest_wait_ms: float, now: float, arrivals: Sequence[tuple[float, int]]) -> Decision:
        """The policy's decision for ``waiting`` images (``arrivals``: each request's arrival and
        images), from the latencies of the last RECENT_S seconds."""
        while self.recent and now - self.recent[0][0] > RECENT_S:  # in the order they finished: drop the expired from the left
            self.recent.popleft()
        recent = [ms for _, ms in self.recent] if self.policy.pinned is None else []  # a pin reads no latencies
        # what each server process has read and not yet put in its ring (a few integer reads a ring)
        upstream = [w for f in self.fronts if (w := f.state.upstream()) is not None] if self.policy.pinned is None else []
        with self.lock:
            decision = self.policy.decide(waiting, oldest_wait_ms, recent, now, arrivals, upstream)
        if decision.switched:  # the latencies seen so far were another stitch's
            self.recent.clear()
        return decision

    def _inline(self, ran: list[tuple[int, float, float]]) -> None:
        """Requests a server process ran itself (:mod:`.inline`), as (images, arrived, latency ms):
        their arrivals and latencies reach the policy as a batch's requests would, and the policy
        decides as after a batch (so it climbs, or steps down, on lone requests too); the stitch it
        names is published."""
        now = time.perf_counter()
        with self.lock:
            for images, arrived, _ in ran:
                self.policy.observe_arrival(images, arrived)
        self.inline += len(ran)
        self.recent.extend((now, ms) for _, _, ms in ran)
        if self.policy.pinned is None:
            images = max(images for images, _, _ in ran)
            self._decide(images, 0.0, now, [(now, images)])  # as for the next lone request
            self.publish()

    def _run_batch(self, torch: Any) -> None:
        c = self.config
        batch, n = [], 0
        while self.jobs and n + self.jobs[0].images <= c.max_batch:  # whole requests, in arrival order
            job = self.jobs.popleft()
            batch.append(job)
            n += job.images
        now = time.perf_counter()
        waiting = n + sum(j.images for j in self.jobs)
        decision = self._decide(waiting, (now - batch[0].arrived) * 1e3, now,
                                [(j.arrived, j.images) for j in itertools.chain(batch, self.jobs)])
        # against the batch before, not the policy's last decision: one made after a lone request run in a server
        # process (_inline) may have switched, and the batch after it, on another stitch than the batch before, said it had not
        switched = self.batch_stitch is not None and decision.stitch != self.batch_stitch
        if switched != decision.switched:
            decision = replace(decision, switched=switched)
        self.batch_stitch = decision.stitch
        self.running = n
        self.publish()
        views = [torch.from_numpy(j.front.ring[at:at + k]) for j in batch for at, k in j.segments]
        t0 = time.perf_counter()
        try:
            probs = probabilities(self.net, decision.stitch, views[0] if len(views) == 1 else torch.cat(views))
            error = None
        except Exception as e:  # noqa: BLE001 - answer every request of the batch, keep serving
            traceback.print_exc()
            probs, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        done = time.perf_counter()
        compute_ms = (done - t0) * 1e3
        self.batches += 1
        self.running = 0
        with self.lock:
            if probs is not None:  # a failed forward's time (often at once) is no measure of the stitch's speed
                self.policy.observe_batch(decision.stitch, n, compute_ms)
            slowdown = self.policy.slowdown
        by_front: dict[int, list[tuple[int, int, int]]] = {}
        start = 0
        for j in batch:
            if probs is not None:  # nor is a failed request's latency
                self.recent.append((done, (done - j.arrived) * 1e3))
            by_front.setdefault(id(j.front), []).append((j.job_id, start, j.images))
            start += j.images
        queue = sum(j.images for j in self.jobs)
        for k, front in enumerate(dict.fromkeys(j.front for j in batch)):
            info = BatchInfo(self.batches, n, compute_ms, decision, queue, slowdown, lead=k == 0).wire()
            jobs = by_front[id(front)]
            message = ("done", info, *pack_results(probs, jobs)) if probs is not None else ("failed", info, jobs, error)
            try:
                send(front.conn, message)
            except OSError:
                pass  # gone: _read drops it at its next message
        if not self.jobs:
            self.publish()  # idle: the next lone request may run in its server process


def _policy(name: str, rows: Sequence[dict[str, Any]], config: ServeConfig) -> StitchController:
    # max_queue: one server process's ring; with several (--workers) the queue here spans them all, so
    # the controller keeps the whole queue within one ring's room: cautious, never past any ring's
    return make_policy(name, ladder(rows), LatencyTable.from_rows(rows),
                       ControllerConfig(config.slo_ms, config.max_batch, up_after=config.up_after, max_queue=config.max_queue,
                                        utilisation=config.utilisation, headroom=config.headroom, steady=None if config.steady_cv2 is None else (config.steady_cv2, 1.0)))


ENV_KEY, ENV_CONFIG_JSON = "SNNET_MODEL_KEY", "SNNET_MODEL_CONFIG"  # how EngineProcess hands the model process its secret and settings


def main() -> None:
    """The model process (``python -c 'from snnet.deploy.serve.engine import main; main()' FD ADDRESS``):
    load, say ``ready`` (or one line of ``error``) on the owner's socket FD, serve until closed."""
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole process group: the servers drain first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    owner, address = Connection(int(sys.argv[1])), sys.argv[2]
    authkey = bytes.fromhex(os.environ.pop(ENV_KEY))

    def tell(message: tuple[str, Any]) -> bool:
        """Send to the owner; False when it is gone (stopped while this process loaded: nobody to tell)."""
        try:
            owner.send(message)
            return True
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return False

    try:
        config = ServeConfig.from_json(os.environ.pop(ENV_CONFIG_JSON))
        engine = _Engine.load(config, lambda text: tell(("say", text)))
        listener = Listener(address, "AF_UNIX", authkey=authkey)
        freeze_heap()  # the network and torch out of the collector's full passes: no 100 ms pause mid-batch (..heap)
    except SnnetError as e:
        tell(("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
        return
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say it in one line, with the traceback in the log
        if tell(("error", f"the model process failed to start ({type(e).__name__}: {e})")):
            traceback.print_exc()
        return
    if tell(("ready", engine.info())):
        engine.serve(listener, owner)


SOCKET_PATH_MAX = 103  # bytes of a Unix socket's path: 107 on Linux, 103 on macOS and the BSDs
_SOCKET_NAME = os.path.join("snnet-model-00000000", "model.sock")  # the longest tail EngineProcess adds


def socket_base() -> str:
    """The folder to make the model process's socket folder in: the temporary folder, or where its
    path is too long for a socket (a deep $TMPDIR, pytest's own under xdist, macOS's /var/folders/...:
    "AF_UNIX path too long"), the first of /tmp and /var/tmp that is short enough and writable."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        if len(os.fsencode(os.path.join(base, _SOCKET_NAME))) <= SOCKET_PATH_MAX and os.access(base, os.W_OK | os.X_OK):
            return base
    raise ServeError(f"the temporary folder {tempfile.gettempdir()} is too deep for the model process's socket "
                     f"(a Unix socket's path is at most {SOCKET_PATH_MAX} bytes) and /tmp is not writable: "
                     "set TMPDIR to a shorter folder")


UNANSWERED = "unanswered"  # the file a server process leaves in the model process's folder when it gave up on requests


def _unanswered_mark(folder: str) -> str:
    """Where the mark of requests given up on is, in the model process's folder (that of its socket)."""
    return os.path.join(folder, UNANSWERED)


def tell_unanswered(address: str) -> None:
    """Tell the owner of the model process listening at ``address`` (another process: ``snnet serve --workers``)
    that this server process gave up on requests it had sent, at its graceful shutdown: the model process did not
    answer them within the bound. A file in the folder of its socket, as the model process, which would be told on
    the socket, is the one not answering; :meth:`EngineProcess.close` reads it. Told before this server process
    disconnects: the model process removes it when it reads a disconnect, running again (a worker restarted on
    SIGHUP gives up on a model process that later recovers and serves on, to be closed, not killed, at the end)."""
    try:
        open(_unanswered_mark(os.path.dirname(address)), "a").close()
    except OSError:
        pass  # the folder is gone: its owner has closed the model process already


class EngineProcess:
    """Starts the model process and owns it: :meth:`close` lets it finish what is queued, then
    stops it. Server processes connect with :meth:`connect` (or :func:`connect` with
    :attr:`address` and :attr:`authkey`).

    A plain subprocess of this interpreter (not :mod:`multiprocessing`), so that it works from
    any caller: a script without a ``__main__`` guard, a uvicorn worker, a Ray replica. It talks
    to its owner over a socket pair, and ends when the owner closes it or goes away."""

    def __init__(self, config: ServeConfig, say: Callable[[str], Any] = print, start_timeout: float = 1800.0) -> None:
        self.config = config
        self.process: subprocess.Popen | None = None
        self._owner: Connection | None = None
        self.folder: str | None = None
        # anything from here on, a SIGTERM that `snnet serve` turns into an exception included, closes
        # what exists so far. So the folder is named before it is made, as mkdtemp does it but in
        # the open: a signal handled between mkdtemp's mkdir and its return would leave a folder
        # nobody knows of. (A short name: a socket's path is limited to 107 bytes.)
        try:
            base = socket_base()
            for _ in range(100):
                self.folder = os.path.join(base, f"snnet-model-{secrets.token_hex(4)}")
                try:
                    os.mkdir(self.folder, 0o700)  # 0700: only this user reaches the socket
                    break
                except OSError as e:
                    self.folder = None  # not ours to remove
                    if not isinstance(e, FileExistsError):
                        raise
            else:
                raise ServeError(f"no free name for the model process's folder in {base}")
            self.address = os.path.join(self.folder, "model.sock")
            self.authkey = os.urandom(32)
            mine, theirs = socket.socketpair()
            env = dict(os.environ, **{ENV_KEY: self.authkey.hex(), ENV_CONFIG_JSON: config.to_json()})
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", "from snnet.deploy.serve.engine import main; main()", str(theirs.fileno()), self.address],
                    pass_fds=[theirs.fileno()], env=env)
            finally:
                theirs.close()
            self._owner = Connection(mine.detach())
            self.info = self._wait_ready(say, start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, say: Callable[[str], Any], timeout: float) -> EngineInfo:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self._owner.poll(max(0.0, min(1.0, deadline - time.monotonic())))
                message = self._owner.recv() if ready else None
            except (EOFError, OSError):
                message = None
                ready = False
                self.process.wait(5)
            if message is None:
                if self.process.poll() is not None:
                    raise ServeError(f"the model process exited with code {self.process.returncode} before it was ready "
                                     "(see the log above)")
                if time.monotonic() > deadline:
                    raise ServeError(f"the model process was not ready after {timeout:.0f} s")
                continue
            kind, payload = message
            if kind == "say":
                say(payload)
            elif kind == "error":
                raise ServeError(payload)
            else:
                return payload

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self, kind: str, *args: Any) -> Connection:
        """A connection to the model process, introduced as ``jobs`` (with the ring) or ``control``."""
        return connect(self.address, self.authkey, kind, *args)

    def close(self, timeout: float = CLOSE_S) -> None:
        """Let the model process finish every queued batch (within ``timeout``, else it is killed), then stop it;
        remove its socket folder. One a server process gave up on (:func:`tell_unanswered`) is killed at once: it
        has had the whole graceful bound already, and what it holds has nobody to answer (under --workers, closed
        after the workers had gone, it held the shutdown twice the bound)."""
        if self.folder is not None and os.path.exists(_unanswered_mark(self.folder)):
            timeout = 0
        try:
            if self.process is not None and self.process.poll() is None:
                try:
                    if self._owner is None:
                        raise OSError("no connection to the model process yet")
                    self._owner.send(("close",))
                except OSError:
                    self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            if self._owner is not None:
                self._owner.close()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)


def connect(address: str, authkey: bytes, kind: str, *args: Any) -> Connection:
    """A connection to the model process at ``address``, introduced as ``jobs`` (with the ring) or ``control``: the
    handshake of :func:`multiprocessing.connection.Client` (which waits for ever) on a socket made here, each step
    waiting JOIN_TIMEOUT_S at most (:func:`joining`)."""
    conn = Connection(socket.socket(socket.AF_UNIX).detach())
    with joining(conn, "connecting to it"):
        sock = socket.socket(socket.AF_UNIX, fileno=conn.fileno())  # the same descriptor, to connect it; conn keeps it
        try:
            sock.connect(address)
        finally:
            sock.detach()
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        conn.send((kind, *args))
    return conn


@contextlib.contextmanager
def joining(conn: Connection, what: str) -> Iterator[Connection]:
    """Within, each read and write on ``conn`` (a socket to the model process) waits JOIN_TIMEOUT_S at most; past
    that ``conn`` is closed and :class:`ServeError` says the model process did not answer (``what``: what it was
    asked). A server process that joined a model process that hangs waited for ever, and its SIGTERM with it: under
    `snnet serve --workers`, a worker starting then (the last of them as the server came up, one uvicorn restarted or
    added) held the whole shutdown until the model process ran again, however long --timeout-graceful-shutdown was."""
    try:
        _give_up_after(conn, JOIN_TIMEOUT_S)
        yield conn
    except BaseException as e:
        conn.close()
        if isinstance(e, BlockingIOError):  # EAGAIN from a blocking socket: its time ran out
            raise ServeError(f"the model process did not answer within {JOIN_TIMEOUT_S:g} s ({what}): it is stopped or hung, "
                             "and this server process cannot join it") from e
        raise
    _give_up_after(conn, 0)  # joined: from here a read waits, as it always did, for the rest of a message that has begun


def _give_up_after(conn: Connection, timeout: float) -> None:
    """Reads and writes on socket ``conn`` wait ``timeout`` s at most (then BlockingIOError); 0: no bound."""
    sock = socket.socket(socket.AF_UNIX, fileno=conn.fileno())  # the same descriptor, to set its options; conn keeps it
    try:
        limit = struct.pack("ll", int(timeout), round(timeout % 1 * 1e6))  # a struct timeval
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    finally:
        sock.detach()
