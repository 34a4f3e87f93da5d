"""Which stitch serves the next batch: the most accurate one whose predicted latency fits an SLO.

A plain object with no HTTP or threads in it, so it can be tested with a synthetic latency table:

* :class:`LatencyTable` holds the milliseconds of one forward per stitch and batch size, as
  ``snnet profile --batch-sizes`` measured them on this device (``latency_by_batch`` rows);
* :func:`ladder` keeps the stitches worth serving: those on the accuracy/FLOPs Pareto front
  (measured top-1 when every row has it, else FLOPs as the accuracy proxy, as
  :mod:`snnet.budget` does), least accurate first;
* :class:`StitchController` is asked, before each batch, for the stitch to run it with, given
  the queue and the recent end-to-end latencies. It predicts the latency each rung of the
  ladder would give the queued requests and picks the most accurate rung that fits within a
  share of the SLO. It steps down at once when the rung in use no longer fits (or, a rung, when the
  recent p95 is over that share although the queue fits), and up one rung at a time, only after
  several decisions in a row with room to spare (a stricter share of the SLO, and the recent p95
  measured under it too): hysteresis, so that a load near a threshold does not make it flap.

* :class:`LastSecond` is the reactive baseline the benchmarks compare it with: once a second, the
  most accurate rung that the last second's arrival rate would have let meet the SLO, judged from
  the table alone (no queue, no measured latencies in between).

The controller only names a stitch; the server runs each batch wholly on the stitch named for
it, one batch after another, so switching never drops or reorders a request.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ..errors import ServeError
from ..report import percentile
from ..results import Row, pareto_front, read_rows

__all__ = ["RECENT_S", "ControllerConfig", "Decision", "LastSecond", "LatencyTable", "StitchController", "ladder", "make_policy"]


RECENT_S = 2.0  # seconds of end-to-end latencies the server passes to ``decide`` (since the last switch)


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of one forward, per stitch id, at a few batch sizes: ``{id: ((batch, ms), ...)}``."""

    ms: Mapping[int, tuple[tuple[int, float], ...]]

    @classmethod
    def from_rows(cls, rows: Sequence[Row | Mapping[str, Any]]) -> "LatencyTable":
        """The ``latency_by_batch`` entries of result rows (``snnet profile --batch-sizes``); a
        row profiled at one batch size only gives that size. Rows without latency are left out."""
        table: dict[int, tuple[tuple[int, float], ...]] = {}
        for r in read_rows(rows):
            points = [(b.batch_size, b.latency_ms) for b in r.latency_by_batch or ()]
            if not points and r.latency_ms is not None:
                points = [(int((r.value("profile") or {}).get("batch_size", 1)), r.latency_ms)]
            if points:
                table[int(r.id)] = tuple(sorted(points))  # type: ignore[arg-type]
        return cls(table)

    def __contains__(self, stitch: int) -> bool:
        return stitch in self.ms

    def batch_sizes(self, stitch: int) -> tuple[int, ...]:
        return tuple(b for b, _ in self.ms[stitch])

    def predict(self, stitch: int, batch: int) -> float:
        """Milliseconds of a forward of ``batch`` images: linear between measured sizes; below the
        smallest, the smallest's time (a call's fixed cost does not shrink); above the largest,
        the largest's time per image times ``batch`` (compute-bound there)."""
        points = self.ms[stitch]
        sizes = [b for b, _ in points]
        if batch <= sizes[0]:
            return points[0][1]
        if batch >= sizes[-1]:
            return points[-1][1] * batch / sizes[-1]
        k = bisect.bisect_left(sizes, batch)
        (b0, t0), (b1, t1) = points[k - 1], points[k]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)


def ladder(rows: Sequence[Row | Mapping[str, Any]]) -> list[Row]:
    """The Pareto-optimal stitches of ``rows`` (id, name, flops, optional acc1), least accurate first:
    the rungs a controller climbs, each the stitch's own row (its ``acc1`` None unless every row has one).

    Ranked by measured top-1 when every row has it; otherwise by FLOPs (more compute buys
    accuracy along SN-Net's frontier), which keeps every stitch of distinct FLOPs. A stitch that
    costs more FLOPs than another and is no more accurate is never worth its latency.
    """
    rows = read_rows(rows)
    if not rows:
        raise ServeError("no stitches to serve")
    measured = all(r.acc1 is not None and not math.isnan(r.acc1) for r in rows)
    proxy = [Row(r.id, r.name, r.flops, acc1=float(r.acc1 if measured else r.flops)) for r in rows]  # type: ignore[arg-type]
    front = pareto_front(proxy)
    rungs = [r if measured else replace(r, acc1=None) for r in rows if r.id in front]
    return sorted(rungs, key=lambda r: (r.acc1 if measured else r.flops, r.flops))


@dataclass(frozen=True)
class ControllerConfig:
    """The SLO and how closely the controller works to it.

    ``headroom``: predictions must fit within this share of the SLO (the rest absorbs HTTP and
    decoding time, requests that arrive while a batch runs, and noise in the p95).
    ``up_headroom`` and ``up_after``: the next more accurate stitch is taken only when it fits
    within this stricter share, at least ``evidence`` recent latencies have a p95 under it too,
    and that held for ``up_after`` decisions in a row. ``evidence``: when at least this many recent latencies have a p95 over
    ``headroom`` x SLO although the prediction fits, the controller steps one rung down (the
    server passes only latencies of requests answered since the last switch, so each step waits
    for new evidence). ``calibration``: weight of each new measured/table ratio in the running
    slowdown factor that scales the table (the machine may be busier than when it was profiled).
    """

    slo_ms: float
    max_batch: int
    headroom: float = 0.8
    up_headroom: float = 0.6
    up_after: int = 5
    calibration: float = 0.2
    evidence: int = 8  # recent latencies needed before their p95 alone moves the controller down
    max_queue: int | None = None  # images the server holds before it answers 503 (its input ring); None: unbounded

    def __post_init__(self) -> None:
        if not self.slo_ms > 0 or self.max_batch < 1 or self.up_after < 1:
            raise ServeError(f"need slo_ms > 0, max_batch >= 1 and up_after >= 1 (got {self.slo_ms}, "
                                  f"{self.max_batch}, {self.up_after})")
        if not 0 < self.up_headroom <= self.headroom <= 1 or not 0 < self.calibration <= 1:
            raise ServeError("need 0 < up_headroom <= headroom <= 1 and 0 < calibration <= 1")


@dataclass(frozen=True)
class Decision:
    """The stitch for one batch, the latency predicted for it, and why."""

    stitch: int
    name: str
    predicted_ms: float | None  # None when pinned to a stitch outside the latency table
    switched: bool
    pinned: bool
    reason: str


class StitchController:
    """Picks each batch's stitch from the ladder, the latency table, the queue and recent latencies."""

    def __init__(self, rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig) -> None:
        if not rungs:
            raise ServeError("the ladder of stitches to serve is empty")
        missing = [r.name for r in rungs if r.id not in table]
        if missing:
            raise ServeError(f"the latency table has no entry for {len(missing)} stitch(es) to serve, e.g. "
                                  f"{missing[0]!r}: profile them with `snnet profile --batch-sizes ...`")
        self.rungs = tuple(rungs)
        self.table = table
        self.config = config
        self.slowdown = 1.0  # measured batch time / table time, smoothed
        self.switches = 0
        self._rung = len(self.rungs) - 1  # start on the most accurate: an idle server can afford it
        self._pinned: Row | None = None
        self._streak = 0  # decisions in a row that had room for a more accurate rung
        self._last: int | None = None  # stitch of the previous decision

    # ------------------------------------------------------------------ policy
    @property
    def pinned(self) -> Row | None:
        return self._pinned

    @property
    def current(self) -> Row:
        """The stitch the next batch would get if nothing changed."""
        return self._pinned or self.rungs[self._rung]

    def pin(self, stitch: Row) -> None:
        """Serve every batch with ``stitch`` (any stitch of the network, on the ladder or not)."""
        self._pinned = stitch

    def unpin(self) -> None:
        """Back to automatic choice, from the rung that was in use before the pin."""
        self._pinned = None
        self._streak = 0

    name = "controller"

    def policy(self) -> dict[str, Any]:
        """What ``GET /stitch`` shows."""
        c = self.config
        return {
            "mode": "pinned" if self._pinned else "auto", "policy": self.name,
            "current": {"id": self.current.id, "name": self.current.name},
            "slo_ms": c.slo_ms, "max_batch": c.max_batch, "headroom": c.headroom, "up_headroom": c.up_headroom,
            "up_after": c.up_after, "slowdown": round(self.slowdown, 3), "switches": self.switches,
            "ladder": [{"id": r.id, "name": r.name, "flops": r.flops, "acc1": r.acc1,
                        "ms_at_max_batch": round(self.table.predict(r.id, c.max_batch), 3)} for r in self.rungs],
        }

    # ------------------------------------------------------------------ prediction
    def predict(self, stitch: int, queue: int, oldest_wait_ms: float = 0.0) -> float:
        """End-to-end milliseconds the queued requests would see if ``stitch`` served them.

        ``queue`` images wait (the batch about to run included); batches of up to ``max_batch``
        run one after another. The oldest request finishes with the first batch, the newest
        when the queue is cleared, and a request that arrives now waits for the queue to clear
        and then runs in a batch like the first: the prediction is the largest of these.
        """
        b = self.config.max_batch
        q = max(queue, 1)
        t = lambda n: self.table.predict(stitch, n) * self.slowdown  # noqa: E731
        full, rest = divmod(q, b)
        first = t(min(q, b))
        clear = full * t(b) + (t(rest) if rest else 0.0)
        return max(oldest_wait_ms + first, clear + first)

    def observe_arrival(self, images: int, now: float) -> None:
        """Images that arrived at ``now`` (``time.perf_counter()``); this controller reads the queue instead."""

    def observe_batch(self, stitch: int, batch: int, ms: float) -> None:
        """A batch's measured compute time: keeps the table's scale in step with the machine's load."""
        if stitch not in self.table or not ms > 0:
            return
        ratio = ms / self.table.predict(stitch, batch)
        a = self.config.calibration
        self.slowdown = min(max((1 - a) * self.slowdown + a * ratio, 0.25), 20.0)

    # ------------------------------------------------------------------ the decision
    def decide(self, queue: int, oldest_wait_ms: float = 0.0, recent_ms: Sequence[float] = (), now: float | None = None) -> Decision:
        """The stitch for the next batch, given ``queue`` images waiting (the batch included),
        how long the oldest has waited, and recent end-to-end latencies (ms) of requests answered
        since the last switch (``now``: the clock, for policies that keep time)."""
        c = self.config
        if self._pinned is not None:
            return self._decide_pinned(queue, oldest_wait_ms)
        preds = [self.predict(r.id, queue, oldest_wait_ms) for r in self.rungs]
        fits = [k for k, p in enumerate(preds) if p <= c.headroom * c.slo_ms]
        cur = self._rung
        if cur not in fits:
            self._streak = 0
            # the most accurate rung that fits; if none does, the fastest one
            self._rung = fits[-1] if fits else min(range(len(preds)), key=lambda k: preds[k])
            why = (f"rung in use predicted {preds[cur]:.1f} ms > {c.headroom:g} x SLO; "
                   + ("stepped down to the most accurate that fits" if fits else "nothing fits: the fastest"))
            return self._record(self.rungs[self._rung], preds[self._rung], False, why)
        p95 = percentile(recent_ms, 0.95, nearest=True)  # nan (no comparison holds) when there are none
        if len(recent_ms) >= c.evidence and p95 > c.headroom * c.slo_ms and cur > 0:
            # The table says the queue fits, but requests are slower than that: time the table does not
            # see (HTTP, decoding, other processes on the CPU). A cheaper stitch leaves more CPU for it.
            self._streak = 0
            self._rung = max([k for k in fits if k < cur] or [cur - 1])
            return self._record(self.rungs[self._rung], preds[self._rung], False,
                                f"recent p95 {p95:.1f} ms > {c.headroom:g} x SLO: stepped down a rung")
        roomy = [k for k, p in enumerate(preds) if k > cur and p <= c.up_headroom * c.slo_ms]
        calm = len(recent_ms) >= c.evidence and p95 <= c.up_headroom * c.slo_ms
        if roomy and calm:
            self._streak += 1
            if self._streak >= c.up_after:
                # one rung at a time, each on the evidence of its own latencies: climbing straight
                # back to where the latency was too high would make it oscillate
                self._streak = 0
                self._rung = roomy[0]
                return self._record(self.rungs[self._rung], preds[self._rung], False,
                                    f"room for {c.up_after} decisions in a row: stepped up a rung")
        else:
            self._streak = 0
        return self._record(self.rungs[cur], preds[cur], False, "fits")

    def _decide_pinned(self, queue: int, oldest_wait_ms: float) -> Decision:
        s = self._pinned
        assert s is not None
        pred = self.predict(s.id, queue, oldest_wait_ms) if s.id in self.table else None
        return self._record(s, pred, True, "pinned")

    def _record(self, rung: Row, pred: float | None, pinned: bool, reason: str) -> Decision:
        switched = self._last is not None and self._last != rung.id
        self.switches += switched
        self._last = rung.id
        return Decision(rung.id, rung.name, pred, switched, pinned, reason)


class LastSecond(StitchController):
    """The reactive baseline (as INFaaS-style servers choose a variant): once every ``window_s``
    it counts the images that arrived in the last window and switches to the most accurate rung
    that would have met the SLO at that rate, judged from the latency table: a rung meets it when
    the rate is within ``headroom`` of its full-batch throughput and a request that waits for one
    full batch and runs in the next finishes within ``headroom`` x SLO. If none would, the
    fastest. Between those moments it holds its choice whatever the queue does: what a policy
    sees when it decides from last second's rate instead of from the queue in front of each batch.
    """

    name = "last-second"

    def __init__(self, rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig, window_s: float = 1.0) -> None:
        super().__init__(rungs, table, config)
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._next: float | None = None
        self._rate = 0.0

    def observe_arrival(self, images: int, now: float) -> None:
        self._arrivals.append((now, images))

    def meets(self, stitch: int, rate: float) -> bool:
        """Whether ``stitch`` serves ``rate`` images/s within the SLO, by the table (scaled by the slowdown)."""
        c = self.config
        full = self.table.predict(stitch, c.max_batch) * self.slowdown
        return rate <= c.headroom * c.max_batch / full * 1e3 and 2 * full <= c.headroom * c.slo_ms

    def decide(self, queue: int, oldest_wait_ms: float = 0.0, recent_ms: Sequence[float] = (), now: float | None = None) -> Decision:
        if self._pinned is not None:
            return self._decide_pinned(queue, oldest_wait_ms)
        now = time.perf_counter() if now is None else now
        if self._next is None or now >= self._next:
            while self._arrivals and self._arrivals[0][0] <= now - self.window_s:
                self._arrivals.popleft()
            self._rate = sum(k for _, k in self._arrivals) / self.window_s
            fits = [k for k, r in enumerate(self.rungs) if self.meets(r.id, self._rate)]
            self._rung = fits[-1] if fits else min(range(len(self.rungs)),
                                                   key=lambda k: self.table.predict(self.rungs[k].id, self.config.max_batch))
            self._next = now + self.window_s
        r = self.rungs[self._rung]
        return self._record(r, self.predict(r.id, queue, oldest_wait_ms), False,
                            f"last {self.window_s:g} s: {self._rate:.0f} images/s")


def make_policy(name: str, rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig) -> StitchController:
    """The stitch policy called ``name``: ``controller`` (:class:`StitchController`) or ``last-second`` (:class:`LastSecond`)."""
    kinds = {k.name: k for k in (StitchController, LastSecond)}
    if name not in kinds:
        raise ServeError(f"unknown stitch policy {name!r}: one of {', '.join(kinds)}")
    return kinds[name](rungs, table, config)
