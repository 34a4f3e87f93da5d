"""A deterministic simulation of the model process under a trace: how a stitch policy would do, in milliseconds of CPU.

The bursty benchmark (``benchmarks/bench_serve.py``) takes minutes a run and its figures move by
several points from run to run on a shared 2-core machine. To design and test a policy, this
module replays the same traces (:func:`snnet.deploy.loadgen.trace`) on a model of what the model
process does (:mod:`snnet.deploy.serve.engine`), event by event:

* a request of ``k`` images arrives at its time and takes ``k`` places in the input ring of
  ``max_queue`` images, or gets a 503 when they are not free (a miss);
* as soon as the model is free and something is queued, a batch starts: whole requests in arrival
  order up to ``max_batch`` images, on the stitch the policy's ``decide`` names (given the queue,
  the oldest request's wait and the latencies of requests answered in the last
  :data:`~snnet.deploy.controller.RECENT_S` seconds since the last switch, as the engine passes them);
* the batch takes the latency table's time for that stitch and size, times ``slowdown`` (a machine
  busier than when it was profiled); its requests are answered at its end, when their places in
  the ring are freed, and ``observe_batch`` is told the time.

* optionally, the **server process's stage** before the ring (``server_ms``: reading, parsing
  and decoding a request, the same for every stitch, measured by the server as its mean work per
  request): requests are taken up one after another; under a burst they wait there, and the
  policy is told of them as the model process is (:class:`~snnet.deploy.controller.Waiting`).

* optionally, **noise** (:class:`Noise`, off by default): each batch's time drawn around the
  table's (lognormal), and time outside the model process added to each answer (exponential:
  sending the answer, the client's side, the scheduler), which the policy is not told of, as the
  server does not measure it. Seeded: a policy, a trace and a seed give one result.

What it leaves out: the load generator and the server process competing with the model for the
two cores (the stage is as long whatever the model does): a simulated run says what a policy does
against the table (and the noise it is given), not what the server measures.
``benchmarks/sim_serve.py`` runs it on the tables of a bursty run.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ServeError
from ..report import percentile
from ..results import Row
from .controller import RECENT_S, ControllerConfig, Decision, LatencyTable, StitchController, Waiting, make_policy

__all__ = ["Bursty", "Clairvoyant", "KnowsLevel", "Noise", "Served", "Summary", "load_bursty", "simulate", "summarise"]


@dataclass(frozen=True)
class Served:
    """One request: when it arrived (s), its latency (ms; None when it got a 503) and its stitch."""

    t: float
    images: int
    ms: float | None
    stitch: int | None


@dataclass(frozen=True)
class Summary:
    """A simulated run as the benchmark summarises a measured one."""

    sent: int
    attainment: float  # share of the requests sent answered within the SLO
    mean_acc1: float  # over answered images
    rejected: int  # 503s
    p95_ms: float
    stitches: int  # distinct stitches used


@dataclass(frozen=True)
class Noise:
    """What the latency table does not say, for :func:`simulate`: ``batch``, the standard deviation of the log of
    each batch's time over the table's (0.05: most batches within 5 % of it; the median stays the table's);
    ``outside_ms``, the mean of an exponential time added to each answer outside the model process (its tail
    makes a few answers late whatever the plan); ``seed`` of the draws."""

    batch: float = 0.0
    outside_ms: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.batch >= 0 and self.outside_ms >= 0 and math.isfinite(self.batch) and math.isfinite(self.outside_ms)):
            raise ServeError(f"need noise batch >= 0 and outside_ms >= 0 (finite), not {self.batch} and {self.outside_ms}")


def simulate(policy: StitchController, times: Sequence[float], images: int, max_queue: int,
             slowdown: float = 1.0, server_ms: float = 0.0, noise: Noise = Noise()) -> list[Served]:
    """Replay arrivals at ``times`` (s, ascending) of ``images`` images each through the model process with
    ``policy`` (its table, ``max_batch`` and SLO); deterministic. ``slowdown``: the batches' real
    time over the table's. ``server_ms``: the server process's work per request before the ring
    (reading, parsing, decoding: one request after another, whatever the stitch); a request takes
    its places in the ring when that work starts (or gets a 503 then, at no cost), is in the ring
    when it ends, and until then is one of the requests the policy is told wait before the ring
    (:class:`~snnet.deploy.controller.Waiting`). 0: requests are in the ring as they arrive. ``noise``: batch times
    drawn around the table's and time outside the model added to each answer (:class:`Noise`; none by default)."""
    b = policy.config.max_batch
    if not (slowdown > 0 and math.isfinite(slowdown) and server_ms >= 0 and math.isfinite(server_ms)):
        # else batches of no or negative time: latencies under zero, every SLO met
        raise ServeError(f"need slowdown > 0 and server_ms >= 0 (finite), not {slowdown} and {server_ms}")
    if images > b or images > max_queue:
        raise ServeError(f"a request of {images} images fits neither a batch of {b} nor a ring of {max_queue}")
    table = policy.table
    draw = random.Random(noise.seed)
    queue: deque[tuple[int, float]] = deque()  # (request index, arrival)
    queued = 0  # images waiting
    recent: deque[tuple[float, float]] = deque()  # (finished, ms) since the last switch
    out: list[Served | None] = [None] * len(times)
    free, running_end, running = 0.0, 0.0, 0  # the model is free at; the batch in flight ends at, holds images
    first_out = 0  # the first request not yet in the ring (nor refused): those from here that arrived wait before it
    reserved = 0  # images of the request in the server's hands: their places are held

    def upstream(now: float) -> list[Waiting]:
        n = bisect.bisect_right(times, now) - first_out
        return [Waiting(n, times[first_out], server_ms, float(images))] if server_ms > 0 and n > 0 else []

    def advance(until: float) -> None:
        """Run every batch that starts before ``until``."""
        nonlocal free, running_end, running, queued
        while queue and (start := max(free, queue[0][1])) < until:
            batch = []
            n = 0
            while queue and n + images <= b:
                batch.append(queue.popleft())
                n += images
            while recent and start - recent[0][0] > RECENT_S:
                recent.popleft()
            d = policy.decide(queued, (start - times[batch[0][0]]) * 1e3, [ms for _, ms in recent] if policy.pinned is None else [],
                              start, [(times[k], images) for k, _ in itertools.chain(batch, queue)],
                              upstream(start) if policy.pinned is None else [])
            if d.switched:
                recent.clear()
            ms = table.predict(d.stitch, n) * slowdown * (math.exp(draw.gauss(0.0, noise.batch)) if noise.batch else 1.0)
            end = start + ms / 1e3
            policy.observe_batch(d.stitch, n, ms)
            for k, _ in batch:
                t = times[k]
                lat = (end - t) * 1e3
                # the time outside the model process reaches the client, not the policy (the server does not measure it)
                out[k] = Served(t, images, lat + (draw.expovariate(1 / noise.outside_ms) if noise.outside_ms else 0.0), d.stitch)
                recent.append((end, lat))
            queued -= n
            free, running_end, running = end, end, n

    server_free = 0.0
    for k, t in enumerate(times):
        begin = max(t, server_free)  # the server process takes it up
        advance(begin)
        held = queued + reserved + (running if running_end > begin else 0)
        if held + images > max_queue:
            out[k] = Served(t, images, None, None)
            first_out = k + 1
            continue
        in_ring = server_free = begin + server_ms / 1e3
        if server_ms > 0:
            reserved = images
            advance(in_ring)
            reserved = 0
        first_out = k + 1
        queue.append((k, in_ring))  # a batch takes it from when it is in the ring; its latency counts from its arrival
        queued += images
        policy.observe_arrival(images, t)
    advance(math.inf)
    return [s for s in out if s is not None]


def summarise(served: Sequence[Served], acc: Mapping[int, float], slo_ms: float) -> Summary:
    ok = [s for s in served if s.ms is not None]
    n_img = sum(s.images for s in ok)
    return Summary(
        sent=len(served), attainment=sum(1 for s in ok if s.ms <= slo_ms) / len(served) if served else math.nan,  # type: ignore[operator]
        mean_acc1=sum(acc[s.stitch] * s.images for s in ok) / n_img if n_img else math.nan,  # type: ignore[index]
        rejected=len(served) - len(ok), p95_ms=percentile((s.ms for s in ok), 0.95, nearest=True),  # type: ignore[misc]
        stitches=len({s.stitch for s in ok}))


# ------------------------------------------------------------------ what foresight reaches: a policy that knows the future


def _answers_all(times: Sequence[float], first: int, queue: Sequence[float], held: deque, free: float, images: int,
                 ms: Sequence[float], max_batch: int, max_queue: int, slo_ms: float) -> bool:
    """Whether one stitch of batch times ``ms[n]`` (ms), pinned from this state on, answers every request within
    ``slo_ms`` and refuses none: ``queue``, the arrivals of the queued requests; ``first``, the index of the first
    request not yet arrived; ``held``, (end s, images) of the batches that hold places; ``free``, when the model is
    free. The same mechanics as :func:`simulate` without a server stage."""
    q, held, n = deque(queue), deque(held), len(times)
    occupied = len(q) * images + sum(k for _, k in held)
    j = first
    while j < n or q:
        if q and (j >= n or max(free, q[0]) <= times[j]):
            start, oldest, k = max(free, q[0]), q[0], 0
            while q and k + images <= max_batch:
                q.popleft()
                k += images
            free = start + ms[k] / 1e3
            if (free - oldest) * 1e3 > slo_ms:
                return False
            held.append((free, k))
        else:
            while held and held[0][0] <= times[j]:
                occupied -= held.popleft()[1]
            if occupied + images > max_queue:
                return False
            occupied += images
            q.append(times[j])
            j += 1
    return True


def _level(config: ControllerConfig, ms: Sequence[Sequence[float]], times: Sequence[float], images: int) -> int:
    """The most accurate rung (``ms``: each rung's batch times by size, as the machine runs them, least accurate rung
    first) that, pinned, answers every request of ``times`` within the SLO and refuses none; the fastest when none does."""
    b, cap = config.max_batch, config.max_queue if config.max_queue is not None else math.inf
    for k in range(len(ms) - 1, -1, -1):
        if _answers_all(times, 0, (), deque(), 0.0, images, ms[k], b, cap, config.slo_ms):  # type: ignore[arg-type]
            return k
    return min(range(len(ms)), key=lambda k: ms[k][b])


class KnowsLevel(StitchController):
    """The controller told one thing about the future: **the level**, the most accurate rung that, pinned, answers the
    whole trace within the SLO and refuses nothing (what :class:`Clairvoyant` falls back to). It plans the rest of each
    queue on that rung (:meth:`~snnet.deploy.controller.StitchController.fallback_rung`) where the controller plans it on
    the most accurate rung that keeps up with the arrival rate; everything else is the controller's. Not a server's
    policy: it says whether knowing the level would close the gap between the controller and the clairvoyant policy
    (it does not, on the DeiT runs' tables: ``benchmarks/sim_serve.py --knows-level``), or whether what the controller
    lacks is when the arrivals come."""

    name = "knows the level"

    def __init__(self, rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig, times: Sequence[float],
                 images: int, slowdown: float = 1.0) -> None:
        super().__init__(rungs, table, config)
        self.level = _level(config, [[t * slowdown for t in row] for row in self._ms], list(times), images)

    def fallback_rung(self, rate: float, limit: float, fastest: int) -> int:
        return min(self.level, self._cap)


class Clairvoyant(StitchController):
    """A policy that knows every arrival to come: **not a server's policy, but what foresight reaches**.

    Its fallback is the most accurate rung that, pinned, answers the whole trace within the SLO and
    refuses nothing (else the fastest rung). Before each batch it takes the most accurate rung such that
    this batch on it, and every later batch on the fallback, still answers every request within the SLO
    without a 503: where the fallback pinned misses nothing, neither does it, and it serves at least the
    fallback's top-1. A scheduler that plans every batch at once could do better still (this one only
    looks one batch ahead of its fallback), so where it meets the benchmark's goal the goal can be met;
    where an online controller serves below it, the difference is the price of not knowing when the next
    burst comes (:func:`simulate` with no server stage only; ``slowdown`` as given to it)."""

    name = "clairvoyant"

    def __init__(self, rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig, times: Sequence[float],
                 images: int, slowdown: float = 1.0) -> None:
        super().__init__(rungs, table, config)
        self.times, self.images = list(times), images
        self._scaled = [[t * slowdown for t in row] for row in self._ms]
        self._max_queue = config.max_queue if config.max_queue is not None else math.inf
        self.fallback = _level(config, self._scaled, self.times, images)

    def decide(self, queue: int, oldest_wait_ms: float = 0.0, recent_ms: Sequence[float] = (), now: float | None = None,
               arrivals: Sequence[tuple[float, int]] | None = None, upstream: Sequence[Waiting] = ()) -> Decision:
        if self._pinned is not None:
            return self._decide_pinned(queue, oldest_wait_ms)
        if now is None or arrivals is None:
            raise ServeError("the clairvoyant policy needs the clock and the queue's arrivals (simulate passes them)")
        c, b, ms = self.config, self.config.max_batch, self._scaled
        heads = [t for t, _ in arrivals]
        first = bisect.bisect_right(self.times, now)
        n = min(len(heads), b // self.images)  # the batch: whole requests up to max_batch images, as simulate makes it
        batch, rest = heads[:n], heads[n:]
        pick = self.fallback
        # the rungs more accurate than the fallback (the ladder is least accurate first), the most accurate first;
        # the model is free (simulate asks before each batch once the last has ended): only this batch will hold places
        for k in range(len(self.rungs) - 1, self.fallback, -1):
            end = now + ms[k][n * self.images] / 1e3
            if any((end - t) * 1e3 > c.slo_ms for t in batch):
                continue
            if _answers_all(self.times, first, rest, deque([(end, n * self.images)]), end, self.images, ms[self.fallback],
                            b, self._max_queue, c.slo_ms):  # type: ignore[arg-type]
                pick = k
                break
        self._rung = pick
        return self._record(self.rungs[pick], None, False, "knows the arrivals to come")


# ------------------------------------------------------------------ a bursty run's settings

SERVER_SETTINGS = ("utilisation", "headroom")  # controller settings of `snnet serve` a bursty run may set, as bursty.json names them


@dataclass(frozen=True)
class Bursty:
    """What a bursty run (``bursty.json``) says about the server it measured: enough to replay its traces."""

    rungs: list[Row]  # the ladder, least accurate first, with top-1
    table: LatencyTable
    slo_ms: float
    max_batch: int
    max_queue: int
    images: int  # per request
    capacity: float  # requests/s of the largest anchor pinned, as measured
    seconds: float
    rate_x: float
    ramp_peak: float
    seed: int
    full_batch_only: bool  # the file holds each rung's full-batch time only (runs before the table was saved)
    server_ms: float | None = None  # the server process's measured work per request before the ring (None: runs before it was)
    # the controller settings the run gave its server (--utilisation, --headroom), by ControllerConfig name; the others are
    # the controller's defaults
    server: dict[str, float] = field(default_factory=dict)
    # per trace, the median over its servers of the model's time over the table's as each server's policy last measured
    # it (the runs since 2026-12-06 record it; empty before): how much slower than its profile the machine ran
    measured_slowdown: dict[str, float] = field(default_factory=dict)

    def policies(self, **settings: Any) -> dict[str, Callable[[], StitchController]]:
        """Every rung pinned, the last-second policy and the controller, as the benchmark compares them: name -> a fresh
        policy. ``settings``: other :class:`~snnet.deploy.controller.ControllerConfig` values than its defaults (the server's)."""
        config = self.config(**settings)
        made: dict[str, Callable[[], StitchController]] = {}
        for r in self.rungs:
            made[f"pinned {r.name}"] = lambda r=r: _pinned(self.rungs, self.table, config, r)
        for name in ("last-second", "controller"):
            made[name] = lambda name=name: make_policy(name, self.rungs, self.table, config)
        return made

    def config(self, **settings: Any) -> ControllerConfig:
        """The controller's settings in this run (the SLO, batch and ring it fixed, the server's settings), ``settings`` over them."""
        free = [f.name for f in fields(ControllerConfig) if f.name not in ("slo_ms", "max_batch", "max_queue")]  # the run fixed these
        unknown = sorted(set(settings) - set(free))
        if unknown:
            raise ServeError(f"{', '.join(unknown)}: not a controller setting to change here (the run fixed the SLO, batch and "
                             f"ring): one of {', '.join(free)}")
        pairs = {f.name for f in fields(ControllerConfig) if "tuple" in str(f.type)}  # (A, B) settings; the others one number
        for name, value in settings.items():
            pair = name in pairs
            if isinstance(value, tuple) != pair or (pair and len(value) != 2):  # else a TypeError deep in the controller's checks
                raise ServeError(f"{name}={value}: give {'two numbers, ' + name + '=A,B' if pair else 'one number'}")
        return ControllerConfig(self.slo_ms, self.max_batch, max_queue=self.max_queue, **(self.server | settings))  # --set wins


def _pinned(rungs: Sequence[Row], table: LatencyTable, config: ControllerConfig, rung: Row) -> StitchController:
    p = StitchController(rungs, table, config)
    p.pin(rung)
    return p


def load_bursty(path: str | Path) -> Bursty:
    """The settings, ladder and latency table of a bursty run's ``bursty.json``.

    Runs before the table was saved in it hold each rung's time for a full batch only; then a
    batch of ``n`` images is taken to cost ``n / max_batch`` of it (compute-bound: true of DeiT
    at 224, optimistic for a tiny network's part-full batches) and ``full_batch_only`` says so."""
    path = Path(path)
    try:
        d: dict[str, Any] = json.loads(path.read_text())
        s = d["settings"]
        b = int(s["max_batch"])
        ms: dict[int, tuple[tuple[int, float], ...]] = {}
        for r in d["ladder"]:
            points = r.get("latency_ms_by_batch")
            ms[int(r["id"])] = (tuple((int(n), float(t)) for n, t in points) if points
                                else tuple((n, float(r["full_batch_ms"]) * n / b) for n in range(1, b + 1)))
        return Bursty(
            rungs=[Row(int(r["id"]), r["name"], acc1=float(r["acc1"])) for r in d["ladder"]], table=LatencyTable(ms),
            slo_ms=float(d["slo_ms"]), max_batch=b, max_queue=int(s["max_queue"]), images=int(s["images_per_request"]),
            capacity=float(d["largest_capacity_rps"]), seconds=float(s["seconds"]), rate_x=float(s["rate_x"]),
            ramp_peak=float(s["ramp_peak"]), seed=int(s["seed"]),
            full_batch_only=not all(r.get("latency_ms_by_batch") for r in d["ladder"]),
            server_ms=float(s["server_work_ms"]) if s.get("server_work_ms") is not None else None,
            server={name: float(s[name]) for name in SERVER_SETTINGS if s.get(name) is not None},
            measured_slowdown={trace: statistics.median(seen) for trace, runs in d.get("summaries", {}).items()
                               if (seen := [float(r["table_slowdown"]) for r in runs.values() if r.get("table_slowdown")])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServeError(f"{path} is not a bursty run's bursty.json ({type(e).__name__}: {e}): "
                         "benchmarks/bench_serve.py writes one") from None
