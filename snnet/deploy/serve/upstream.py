"""The wait before the ring: requests a server process has read but not yet handed to the model process.

Under a burst a server process reads requests faster than it handles them (HTTP, multipart, PNG
decoding: about 2 ms of CPU for 16 Fashion-MNIST PNGs on this machine, the same whatever the
stitch), so requests queue here, on the event loop, before they reach the input ring the model
process batches from. The controller plans every request's deadline from its arrival: it has to
see this wait too, or a burst queued here looks to it like a short queue (issue 20).

* :class:`StampedProtocol`: uvicorn's HTTP protocol, plus one thing: when a request's first bytes
  are parsed, their time goes into the request's ASGI scope (``scope["snnet.arrived"]``: the
  arrival the server measures latency and deadlines from, rather than the handler's start, which
  a burst delays by every request read before it), and a ``POST /predict`` whose body has all
  arrived is admitted to the process's :class:`Upstream` (a slow upload is not waiting on this
  process; one answered before its body was all read, a 413, never is). A handler starts only when the requests before it have been
  decoded: the time a request waits for the event loop is visible only from here.
* :class:`Upstream`: the requests admitted and not yet in the ring (their count and the oldest
  arrival), the running mean of the server's own work per request (handler start to ring submit)
  and of its images, written into the ring's server words (:class:`~.engine.RingState`) where the
  model process reads them before each batch (a few integer reads).

What it cannot see: bytes still in the kernel's socket buffers while the event loop works (at most
the loop's current turn), and requests of another HTTP front end (Ray Serve's proxy: there the
wait starts at the handler, as before).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .engine import RingState

__all__ = ["ARRIVED", "KEY", "StampedProtocol", "Upstream", "release", "stamped"]

ARRIVED, KEY, TRACKER = "snnet.arrived", "snnet.upstream", "snnet.tracker"  # scope keys: perf_counter() of the first bytes;
# the request's Upstream entry and the Upstream it is in
MEAN_WEIGHT = 0.1  # weight of each request in the running means of the server's work and images per request


class Upstream:
    """The requests of one server process between their arrival and the ring (see the module)."""

    def __init__(self, state: RingState | None = None, stale_s: float = 60.0) -> None:
        self.state = state  # where the model process reads them (None: kept here only)
        self.stale_s = stale_s  # an entry older than this is dropped (a request whose handler never ran)
        # key -> arrival, in the order admitted: not the order of arrival (a slow upload is admitted after
        # requests that arrived after its first bytes)
        self._admitted: dict[int, float] = {}
        self._next = 0
        self.work_ms = 0.0  # running mean of the server's work per request, handler start to ring submit
        self.images = 1.0  # running mean of images per request
        self._publish()

    def __len__(self) -> int:
        return len(self._admitted)

    def oldest(self) -> float | None:
        return min(self._admitted.values(), default=None)

    def admit(self, arrived: float) -> int:
        """A request read at ``arrived`` (perf_counter): its key for :meth:`leave`."""
        key = self._next
        self._next += 1
        self._admitted[key] = arrived
        stale = [k for k, t in self._admitted.items() if t < arrived - self.stale_s]
        for k in stale:
            del self._admitted[k]
        self._publish()
        return key

    def leave(self, key: int | None) -> None:
        """The request is in the ring, ran here, or was answered otherwise (again: nothing)."""
        if key is not None and self._admitted.pop(key, None) is not None:
            self._publish()

    def worked(self, ms: float, images: int) -> None:
        """A request's handling took ``ms`` of this process from its handler's start to the ring."""
        a = MEAN_WEIGHT
        self.work_ms = ms if self.work_ms == 0 else (1 - a) * self.work_ms + a * ms
        self.images = (1 - a) * self.images + a * images
        self._publish()

    def _publish(self) -> None:
        if self.state is not None:
            self.state.publish_upstream(len(self._admitted), self.oldest(), self.work_ms, self.images)


class StampedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol that stamps each request's arrival and admits ``POST /predict``
    to :attr:`upstream` (``snnet serve`` passes it as uvicorn's ``http``; see the module). The class
    attribute is the server process's :class:`Upstream`: :func:`stamped` binds one, and a uvicorn
    worker's service sets it when it starts (one served network per server process)."""

    upstream: ClassVar[Upstream | None] = None

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        super().data_received(data)
        scope: dict[str, Any] | None = getattr(self, "scope", None)
        if scope is None or KEY in scope:
            return
        arrived = scope.setdefault(ARRIVED, t)  # the first bytes of a request whose head spans reads
        if "path" not in scope:  # the head is not complete yet
            return
        up = type(self).upstream
        if up is None or scope["path"] != "/predict" or scope.get("method") != "POST":
            scope[KEY] = None
            return
        cycle = getattr(self, "cycle", None)
        if cycle is None or getattr(cycle, "scope", None) is not scope:
            return
        if getattr(cycle, "response_started", False):  # answered before its body was all here (413, 408): never waits
            scope[KEY] = None
        elif not getattr(cycle, "more_body", True):  # all here: it waits for this process from now on (a slow upload holds nothing)
            scope[KEY], scope[TRACKER] = up.admit(arrived), up

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle  # the request being answered (uvicorn's `cycle` is the newest read, pipelined or not)
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        # HTTP/1.1 pipelining (requests sent before the answer to the one before), two things uvicorn leaves:
        # * the requests queued behind the one being answered are never started once the client is gone, so no
        #   handler of theirs leaves the Upstream: each would count as waiting for this process (the latency path
        #   off, the controller planning for it) until it went stale;
        # * it marks only the newest request read as disconnected, so the one being answered writes its answer to
        #   the closed transport, and uvloop's RuntimeError lands in the log as "Exception in ASGI application"
        for cycle, _ in getattr(self, "pipeline", ()):
            release(cycle.scope)
        running = getattr(self, "_running", None)
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)


def release(scope: dict[str, Any]) -> None:
    """The request of ``scope`` no longer waits for the ring (in it, answered, or refused), whoever answered it."""
    up = scope.get(TRACKER)
    if up is not None:
        up.leave(scope.get(KEY))


def stamped(upstream: Upstream) -> type[StampedProtocol]:
    """The protocol class for a server whose requests are admitted to ``upstream``."""
    return type("StampedProtocol", (StampedProtocol,), {"upstream": upstream})
