"""Which stitch generates the next completion: the most capable one whose predicted time to first
token (TTFT) and time per output token (TPOT) hold the latency targets for every request waiting.

A plain object with no HTTP, threads or model in it, so a test gives it the times it should
believe (:mod:`snnet.deploy.serve.lm_engine` measures them on the serving machine at start):

* :class:`TokenTiming` is one stitch's table: milliseconds from the start of a generation to its
  first token at a few prompt lengths (prefill plus one decoding step), and milliseconds per
  further output token;
* :func:`lm_ladder` keeps the stitches worth serving: lowest bits per byte (or loss) for their
  FLOPs when an evaluation gives them for every stitch, else every stitch of distinct FLOPs
  (more compute buys quality along SN-Net's frontier), cheapest first;
* :class:`LMController` is asked, when the generation worker takes the next request, which
  stitch to run it on. One worker generates one request at a time (no continuous batching), so
  a request waits for everything ahead of it: the controller predicts, for each rung, the TTFT of
  the request starting now *and of every request queued behind it* if the rung served them all
  (each needs its prefill and up to ``max_tokens`` output tokens), and the rung's TPOT; it takes
  the most capable rung that keeps both within a share of their targets. As the queue grows, only
  cheaper rungs fit. Requests still to come are planned for too, from the recent arrival rate (the
  mean wait of a queue with Poisson arrivals served one at a time on the rung), so the stitch
  steps down as the rate rises, before a queue forms. Two running factors, measured over table (one for the prefill, one per
  output token), scale the table to what the machine gives now (other load, longer contexts).
  Hysteresis: a rung above the last one used must fit a stricter share.

The stitch of a request is fixed when it starts (its KV cache belongs to its route); the next
request may run on another. ``pin`` overrides the choice until ``auto``.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from ..errors import ServeError
from ..results import Row, read_rows
from .controller import ladder

__all__ = ["LMController", "LMControllerConfig", "LMDecision", "TokenTiming", "Waiting", "lm_ladder"]


@dataclass(frozen=True)
class TokenTiming:
    """One stitch's measured times: ``first_ms`` = ((prompt tokens, ms from the start of a generation
    to its first output token), ...) at one or more prompt lengths, and ``tpot_ms`` per further token."""

    first_ms: tuple[tuple[int, float], ...]
    tpot_ms: float

    def __post_init__(self) -> None:
        points = tuple(sorted((int(n), float(ms)) for n, ms in self.first_ms))
        if not points or any(n < 1 or not ms >= 0 for n, ms in points) or not self.tpot_ms >= 0:
            raise ServeError(f"a token timing needs prompt lengths >= 1 and times >= 0, got {self.first_ms}, {self.tpot_ms}")
        object.__setattr__(self, "first_ms", points)

    def first(self, prompt_tokens: int) -> float:
        """Milliseconds to the first token of a prompt this long: linear between measured lengths
        and beyond the longest (prefill grows about linearly with the prompt at these sizes); below
        the shortest, the shortest's time (a step's fixed cost does not shrink)."""
        sizes = [n for n, _ in self.first_ms]
        if len(sizes) == 1 or prompt_tokens <= sizes[0]:
            return self.first_ms[0][1] if prompt_tokens <= sizes[0] else self.first_ms[0][1] * prompt_tokens / sizes[0]
        k = min(max(bisect.bisect_left(sizes, prompt_tokens), 1), len(sizes) - 1)
        (n0, t0), (n1, t1) = self.first_ms[k - 1], self.first_ms[k]
        return max(t0, t0 + (t1 - t0) * (prompt_tokens - n0) / (n1 - n0))

    def to_dict(self) -> dict[str, Any]:
        return {"first_ms": [list(p) for p in self.first_ms], "tpot_ms": self.tpot_ms}


def _quality(row: Row) -> float | None:
    """Bits per byte of a result row, else its loss (both lower-is-better), else None."""
    for v in (row.bpb, row.loss):
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def lm_ladder(rows: Sequence[Row | Mapping[str, Any]], most: int | None = None) -> list[Row]:
    """The stitches of ``rows`` (id, name, flops, optional bpb/loss) worth serving, cheapest first:
    each the stitch's own row, its ``bpb`` the quality it was ranked by (bits per byte, else the loss
    where a row has no bits per byte; None unless every row has one).

    With a measured bits per byte (or loss) for every row: the Pareto front (no stitch costs more
    and is worse). Otherwise every stitch of distinct FLOPs (the cheapest name of equal FLOPs).
    ``most`` thins a long ladder to that many rungs spread evenly over it, both ends kept: each
    rung is timed when the server starts.
    """
    rows = read_rows(rows)
    scores = {r.id: _quality(r) for r in rows}
    measured = all(s is not None for s in scores.values())
    front = ladder([Row(r.id, r.name, r.flops, acc1=-scores[r.id] if measured else None)  # type: ignore[operator]
                    for r in rows])  # the image ladder, with bits per byte as negative accuracy
    by_id = {r.id: r for r in rows}
    rungs = sorted((replace(by_id[r.id], bpb=scores[r.id] if measured else None) for r in front),
                   key=lambda r: (r.flops, r.id))
    if most is not None and len(rungs) > most >= 2:
        picks = sorted({round(k * (len(rungs) - 1) / (most - 1)) for k in range(most)})
        rungs = [rungs[k] for k in picks]
    return rungs


@dataclass(frozen=True)
class Waiting:
    """A request as the controller sees it: its prompt length, the most tokens it may generate, and
    when it arrived (seconds, on the clock ``decide`` is given ``now`` from)."""

    prompt_tokens: int
    max_tokens: int
    arrived: float


@dataclass(frozen=True)
class LMControllerConfig:
    """The targets (either may be None) and how closely the controller works to them.

    ``ttft_ms``: time to first token target, counted from arrival (queueing included) for every
    request; ``tpot_ms``: time per output token target. Predictions must fit within ``headroom`` of
    a target (the rest absorbs HTTP, tokenisation and noise); a rung more capable than the last
    one used within ``up_headroom`` (hysteresis). ``calibration``: the weight of each new
    measured/table ratio in the running factors that scale the table.
    """

    ttft_ms: float | None = 1000.0
    tpot_ms: float | None = None
    headroom: float = 0.8
    up_headroom: float = 0.6
    calibration: float = 0.2

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ServeError(f"{name} must be a finite number > 0 (or None: no target), got {v}")
        if not 0 < self.up_headroom <= self.headroom <= 1 or not 0 < self.calibration <= 1:
            raise ServeError("need 0 < up_headroom <= headroom <= 1 and 0 < calibration <= 1")


@dataclass(frozen=True)
class LMDecision:
    """The stitch for one request, and why: the predicted TTFT of this request and the worst of those
    queued behind it (and of one arriving later, given a rate), the predicted TPOT (None when the stitch has no timing: a pin off the
    ladder), whether the targets fit, and how many requests were waiting."""

    stitch: int
    name: str
    pinned: bool
    ttft_ms: float | None = None
    worst_ttft_ms: float | None = None
    tpot_ms: float | None = None
    fits: bool = True
    waiting: int = 0
    switched: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Scale:
    """A running measured/table ratio (starts at 1: the table as measured)."""

    weight: float
    value: float = 1.0
    samples: int = 0

    def update(self, measured: float, table: float) -> None:
        if table > 0 and measured >= 0 and math.isfinite(measured):
            ratio = min(max(measured / table, 0.05), 100.0)
            self.value = ratio if self.samples == 0 else (1 - self.weight) * self.value + self.weight * ratio
            self.samples += 1


@dataclass
class LMController:
    """Picks the stitch of each request as it starts (see the module)."""

    rungs: Sequence[Row]
    table: Mapping[int, TokenTiming]
    config: LMControllerConfig = field(default_factory=LMControllerConfig)

    def __post_init__(self) -> None:
        self.rungs = list(self.rungs)
        if not self.rungs:
            raise ServeError("the controller needs at least one stitch to serve")
        missing = [r.name for r in self.rungs if r.id not in self.table]
        if missing:
            raise ServeError(f"no token timing for {missing}: time every rung before serving")
        self.prefill = _Scale(self.config.calibration)
        self.decode = _Scale(self.config.calibration)
        self.current = len(self.rungs) - 1  # the most capable rung until the load says otherwise
        self.pinned: tuple[int, str] | None = None
        self._last: int | None = None

    # ------------------------------------------------------------------ predictions
    def predict(self, rung: Row, now: float, queue: Sequence[Waiting], rate: float | None = None) -> tuple[float, float, float]:
        """(TTFT of ``queue[0]``, the worst TTFT, TPOT) in ms if ``rung`` served the whole queue in
        order, each request to its ``max_tokens``, on the table scaled by what was measured.

        With ``rate`` (requests a second of late), the worst includes a request arriving later: its
        mean wait in an M/D/1 queue on this rung (Pollaczek-Khinchine: rho x S / (2 (1 - rho)),
        S the time of a request like those queued, rho = rate x S) plus its own first token;
        infinite when the rung cannot keep up with the rate (rho >= 1)."""
        t = self.table[rung.id]
        tpot = t.tpot_ms * self.decode.value
        free, first, worst = now, math.nan, 0.0
        for k, w in enumerate(queue):
            start = max(free, w.arrived) + t.first(w.prompt_tokens) * self.prefill.value / 1e3
            ttft = (start - w.arrived) * 1e3
            first = ttft if k == 0 else first
            worst = max(worst, ttft)
            free = start + max(w.max_tokens - 1, 0) * tpot / 1e3
        if rate is not None and rate > 0:
            own = t.first(round(statistics.mean(w.prompt_tokens for w in queue))) * self.prefill.value
            service = own + (statistics.mean(w.max_tokens for w in queue) - 1) * tpot
            rho = rate * service / 1e3
            worst = max(worst, math.inf if rho >= 1 else rho * service / (2 * (1 - rho)) + own)
        return first, worst, tpot

    def _fits(self, worst: float, tpot: float, share: float) -> bool:
        c = self.config
        return (c.ttft_ms is None or worst <= share * c.ttft_ms) and (c.tpot_ms is None or tpot <= share * c.tpot_ms)

    def decide(self, now: float, queue: Sequence[Waiting], rate: float | None = None) -> LMDecision:
        """The stitch for ``queue[0]``, the request starting now; the rest are waiting behind it in
        order. ``rate``: requests a second of late, so that requests still to come are planned for
        (see :meth:`predict`): the stitch steps down as the rate rises, before a queue forms."""
        if not queue:
            raise ServeError("decide needs the request that starts now (queue[0])")
        waiting = len(queue) - 1
        if self.pinned is not None:
            sid, name = self.pinned
            rung = next((r for r in self.rungs if r.id == sid), None)
            if rung is None:
                return self._made(LMDecision(sid, name, True, waiting=waiting))
            first, worst, tpot = self.predict(rung, now, queue, rate)
            return self._made(LMDecision(sid, name, True, first, worst, tpot, self._fits(worst, tpot, self.config.headroom),
                                         waiting))
        chosen, fits = 0, False
        for k in range(len(self.rungs) - 1, -1, -1):
            first, worst, tpot = self.predict(self.rungs[k], now, queue, rate)
            share = self.config.up_headroom if k > self.current else self.config.headroom
            if self._fits(worst, tpot, share):
                chosen, fits = k, True
                break
        self.current = chosen
        rung = self.rungs[chosen]
        first, worst, tpot = self.predict(rung, now, queue, rate)
        return self._made(LMDecision(rung.id, rung.name, False, first, worst, tpot, fits, waiting))

    def _made(self, d: LMDecision) -> LMDecision:
        switched = self._last is not None and self._last != d.stitch
        self._last = d.stitch
        return LMDecision(**{**d.to_dict(), "switched": switched})

    # ------------------------------------------------------------------ what happened
    def observe(self, stitch: int, prompt_tokens: int, first_ms: float, tpot_ms: float | None) -> None:
        """A generation ran on ``stitch``: ``first_ms`` from its start to its first token, ``tpot_ms``
        per further token (None with one token). Updates the factors that scale the table."""
        t = self.table.get(stitch)
        if t is None:
            return
        self.prefill.update(first_ms, t.first(prompt_tokens))
        if tpot_ms is not None:
            self.decode.update(tpot_ms, t.tpot_ms)

    def pin(self, stitch: int, name: str) -> None:
        self.pinned = (int(stitch), str(name))

    def auto(self) -> None:
        self.pinned = None

    def state(self) -> dict[str, Any]:
        """What GET /stitch shows: the mode, the targets, the scale factors and the ladder with its table."""
        c = self.config
        return {"mode": "pinned" if self.pinned else "auto", "policy": "lm-controller",
                "pinned": {"id": self.pinned[0], "name": self.pinned[1]} if self.pinned else None,
                "ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms, "headroom": c.headroom, "up_headroom": c.up_headroom,
                "slowdown": {"prefill": self.prefill.value, "decode": self.decode.value},
                "current": {"id": self.rungs[self.current].id, "name": self.rungs[self.current].name},
                "ladder": [{"id": r.id, "name": r.name, "flops": r.flops, "bpb": r.bpb, **self.table[r.id].to_dict()}
                           for r in self.rungs]}
