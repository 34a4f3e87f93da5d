"""Which stitch serves the next batch: the most accurate one whose predicted latency fits an SLO.

A plain object with no HTTP or threads in it, so it can be tested with a synthetic latency table:

* :class:`LatencyTable` holds the milliseconds of one forward per stitch and batch size, as
  ``snnet profile --batch-sizes`` measured them on this device (``latency_by_batch`` rows);
* :func:`ladder` keeps the stitches worth serving: those on the accuracy/FLOPs Pareto front
  (measured top-1 when every row has it, else FLOPs as the accuracy proxy, as
  :mod:`snnet.budget` does), least accurate first;
* :class:`StitchController` is asked, before each batch, for the stitch to run it with, given
  the queue, the recent end-to-end latencies and the arrivals it was told of. A rung **fits** when
  three limits hold, by the table: the latency it predicts for the queued requests is within a
  share of the SLO; at the arrival rate (an exponentially weighted average over a few SLOs) its
  utilisation stays under 1, so that it keeps up; and at the short-term rate the room left in
  the server's ring (``max_queue``) lasts longer than the rung takes to serve the queue, since a
  full ring answers 503. It steps down at once to the most accurate rung that fits when the one in
  use no longer does (or, a rung, when the recent p95 is over that share although the queue
  fits), and up only after several decisions in a row with room to spare on every limit (a
  stricter share, and the recent p95 measured under it too), then straight to the most accurate
  such rung: hysteresis, so that a load near a threshold does not make it flap.
  (Without the rate and the ring it stayed on the most accurate rungs and shed bursts with 503s
  once the ring was full: the bursty benchmark at DeiT scale, issue 20.)

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

    ``max_queue``: the images the server holds before it answers 503 (its ring); the controller
    keeps the queue clear of it. ``rate_windows``: time constants of the short and the long
    average of the arrival rate, in SLOs (1 and 8: a burst is seen within an SLO, a busy spell
    remembered for several).
    ``headroom``: predictions must fit within this share of the SLO (the rest absorbs HTTP and
    decoding time, requests that arrive while a batch runs, and noise in the p95).
    ``up_headroom`` and ``up_after``: a more accurate stitch is taken only when it fits
    within this stricter share on every limit, at least ``evidence`` recent latencies have a p95 under it too,
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
    rate_windows: tuple[float, float] = (1.0, 8.0)  # time constants of the two arrival-rate averages, in SLOs

    def __post_init__(self) -> None:
        if not self.slo_ms > 0 or self.max_batch < 1 or self.up_after < 1:
            raise ServeError(f"need slo_ms > 0, max_batch >= 1 and up_after >= 1 (got {self.slo_ms}, "
                                  f"{self.max_batch}, {self.up_after})")
        if not 0 < self.up_headroom <= self.headroom <= 1 or not 0 < self.calibration <= 1:
            raise ServeError("need 0 < up_headroom <= headroom <= 1 and 0 < calibration <= 1")
        if self.max_queue is not None and self.max_queue < self.max_batch:
            raise ServeError(f"need max_queue >= max_batch (got {self.max_queue} < {self.max_batch})")
        if len(self.rate_windows) != 2 or not 0 < self.rate_windows[0] <= self.rate_windows[1]:
            raise ServeError(f"need rate_windows (short, long) with 0 < short <= long, got {self.rate_windows}")


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
        # arrival rate (images/s), two exponentially weighted averages: a short one that sees a burst
        # begin and a long one that remembers a busy spell; each is a decayed count over its time constant
        self._taus = tuple(w * config.slo_ms / 1e3 for w in config.rate_windows)
        self._rates = [0.0, 0.0]
        self._rate_t: float | None = None  # the clock the averages were last decayed to
        self._rate_start: float | None = None  # the first arrival: averages younger than their time constant are scaled up

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
            "up_after": c.up_after, "slowdown": round(self.slowdown, 3), "switches": self.switches, "max_queue": c.max_queue,
            "arrival_rate_images_s": [round(r, 1) for r in self.rates()],  # short, long average (as of the last arrival)
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
        q = max(queue, 1)
        first = self.table.predict(stitch, min(q, self.config.max_batch)) * self.slowdown
        return max(oldest_wait_ms + first, self.serve_ms(stitch, q) + first)

    def serve_ms(self, stitch: int, images: int) -> float:
        """Milliseconds ``stitch`` takes to serve ``images`` queued images: full batches, then the rest (scaled by the slowdown)."""
        full, rest = divmod(images, self.config.max_batch)
        t = self.table.predict
        return (full * t(stitch, self.config.max_batch) + (t(stitch, rest) if rest else 0.0)) * self.slowdown

    def observe_arrival(self, images: int, now: float) -> None:
        """Images that arrived at ``now`` (``time.perf_counter()``): into both arrival-rate averages."""
        if self._rate_start is None:
            self._rate_start = now
        self._decay(now)
        self._rates = [r + images / tau for r, tau in zip(self._rates, self._taus)]

    def _decay(self, now: float | None) -> None:
        if now is None:
            return
        if self._rate_t is not None and now > self._rate_t:
            dt = now - self._rate_t
            self._rates = [r * math.exp(-dt / tau) for r, tau in zip(self._rates, self._taus)]
        if self._rate_t is None or now > self._rate_t:
            self._rate_t = now

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """The short and the long average of the arrival rate (images/s) at ``now`` (default: as last updated)."""
        self._decay(now)
        if self._rate_start is None or self._rate_t is None:
            return 0.0, 0.0
        # an average started from nothing at the first arrival holds (1 - exp(-elapsed/tau)) of the
        # rate: divided by that, it is the mean rate since then (else a long average would read a
        # busy start as idle for tens of seconds); elapsed is counted from one short time constant
        # on, so that the first arrivals alone do not read as a flood
        elapsed = max(self._rate_t - self._rate_start, self._taus[0])
        short, long = (r / (1 - math.exp(-elapsed / tau)) for r, tau in zip(self._rates, self._taus))
        return short, long

    def fits(self, stitch: int, queue: int, oldest_wait_ms: float, rates: tuple[float, float], share: float) -> bool:
        """Whether ``stitch`` serves the queue and the arrivals within ``share`` of the limits, by the table:

        * **latency**: :meth:`predict` for the queue within ``share`` x SLO;
        * **rate**: at the long average of the arrival rate, its utilisation (rate x full-batch
          time per image) is under 1 (``share`` / ``headroom``: 0.75 by default to step up): a rung
          that cannot keep up with the arrivals builds a queue that no later decision clears in
          time, however short the queue is when it is chosen;
        * **room** (with ``max_queue``): the images that arrive at the short average of the rate
          while the rung serves the queue fit, with ``share`` to spare, in the room left in the
          server's ring; counted as if none of the queue's room were freed before the queue is
          served (batches free theirs only as they end; and the short average lags the start of a
          burst: simulated, the finer estimate that credits each batch's room as it ends shed
          requests at DeiT scale). Past the ring, arrivals get 503s, which miss the SLO as surely
          as a late answer.
        """
        c = self.config
        if self.predict(stitch, queue, oldest_wait_ms) > share * c.slo_ms:
            return False
        per_image_s = self.table.predict(stitch, c.max_batch) * self.slowdown / c.max_batch / 1e3
        if rates[1] * per_image_s > share / c.headroom:
            return False
        if c.max_queue is not None and rates[0] > 0 and self.serve_ms(stitch, queue) / 1e3 * rates[0] > share * (c.max_queue - queue):
            return False
        return True

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
        how long the oldest has waited, recent end-to-end latencies (ms) of requests answered
        since the last switch, and ``now`` (the clock of :meth:`observe_arrival`; the arrival
        rates are taken as last updated when it is None)."""
        c = self.config
        if self._pinned is not None:
            return self._decide_pinned(queue, oldest_wait_ms)
        rates = self.rates(now)
        cur = self._rung
        fit = lambda k, share: self.fits(self.rungs[k].id, queue, oldest_wait_ms, rates, share)  # noqa: E731
        pred = lambda k: self.predict(self.rungs[k].id, queue, oldest_wait_ms)  # noqa: E731
        if not fit(cur, c.headroom):
            self._streak = 0
            # the most accurate rung that fits (searched from the top: most decisions stop at once); if none does, the fastest
            best = next((k for k in range(len(self.rungs) - 1, -1, -1) if fit(k, c.headroom)), None)
            self._rung = best if best is not None else min(range(len(self.rungs)), key=pred)
            r0, r1 = rates
            why = (f"rung in use does not fit (predicted {pred(cur):.1f} ms, {r0:.0f}/{r1:.0f} images/s, queue {queue}) "
                   f"within {c.headroom:g} of the limits; "
                   + ("stepped down to the most accurate that fits" if best is not None else "nothing fits: the fastest"))
            return self._record(self.rungs[self._rung], pred(self._rung), False, why)
        enough = len(recent_ms) >= c.evidence
        p95 = percentile(recent_ms, 0.95, nearest=True) if enough else math.nan
        if enough and p95 > c.headroom * c.slo_ms and cur > 0:
            # The table says the queue fits, but requests are slower than that: time the table does not
            # see (HTTP, decoding, other processes on the CPU). A cheaper stitch leaves more CPU for it.
            self._streak = 0
            self._rung = next((k for k in range(cur - 1, -1, -1) if fit(k, c.headroom)), cur - 1)
            return self._record(self.rungs[self._rung], pred(self._rung), False,
                                f"recent p95 {p95:.1f} ms > {c.headroom:g} x SLO: stepped down a rung")
        # the most accurate rung above with room to spare on every limit (the ladder's latencies need not rise with accuracy)
        up = (next((k for k in range(len(self.rungs) - 1, cur, -1) if fit(k, c.up_headroom)), None)
              if enough and p95 <= c.up_headroom * c.slo_ms else None)
        if up is None:
            self._streak = 0
        else:
            self._streak += 1
            if self._streak >= c.up_after:
                # straight there, not one rung at a time: a ladder of 39 DeiT rungs climbed a rung per
                # round of evidence stays low for most of a lull; the stricter share and the streak
                # keep it from flapping near a threshold
                self._streak = 0
                self._rung = up
                return self._record(self.rungs[up], pred(up), False,
                                    f"room for {c.up_after} decisions in a row: stepped up to the most accurate rung with room")
        return self._record(self.rungs[cur], pred(cur), False, "fits")

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
        super().observe_arrival(images, now)  # the averages GET /stitch shows

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
