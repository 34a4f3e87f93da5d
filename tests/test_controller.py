"""The stitch controller's arrival-rate and ring limits (issue 20), on a synthetic 3-rung table; the
queue-and-latency behaviour it had before is tested with the server in tests/test_serve.py."""

from __future__ import annotations

import pytest

from snnet.deploy.controller import ControllerConfig, LatencyTable, StitchController
from snnet.errors import ServeError
from snnet.results import Row

RUNGS = [Row(0, "cheap", 100, acc1=80.0), Row(1, "mid", 300, acc1=83.0), Row(2, "dear", 1000, acc1=86.0)]
# overhead 1 ms + per image: a full batch of 8 takes 5, 13 and 41 ms: 1600, 615 and 195 images/s
TABLE = LatencyTable({k: tuple((b, 1.0 + c * b) for b in (1, 2, 4, 8)) for k, c in {0: 0.5, 1: 1.5, 2: 5.0}.items()})


def _controller(**kw) -> StitchController:
    return StitchController(RUNGS, TABLE, ControllerConfig(slo_ms=200.0, max_batch=8, **kw))


def _steady(ctl: StitchController, rate: float, seconds: float, images: int = 2, start: float = 0.0) -> float:
    """Arrivals of ``images`` at ``rate`` images/s for ``seconds``; returns the clock at the end."""
    gap = images / rate
    t = start
    for _ in range(int(seconds / gap)):
        ctl.observe_arrival(images, t)
        t += gap
    return t


def test_the_arrival_rate_averages_read_the_rate_from_the_first_arrivals_on() -> None:
    ctl = _controller()  # windows of 1 and 8 SLOs: 0.2 and 1.6 s
    assert ctl.rates(0.0) == (0.0, 0.0)
    now = _steady(ctl, 400.0, 0.5)
    short, long = ctl.rates(now)
    # after 0.5 s, well within the long average's 1.6 s, both read the rate (the long one is scaled for its age)
    assert short == pytest.approx(400.0, rel=0.1) and long == pytest.approx(400.0, rel=0.1)
    short, long = ctl.rates(now + 0.6)  # 0.6 s without arrivals: the short average forgets them within a few SLOs,
    assert short < 0.1 * 400 and 0.25 * 400 < long < 0.5 * 400  # the long one reads about the mean since the first (400 x 0.5 / 1.1)


def test_a_rung_that_cannot_keep_up_with_the_arrivals_is_not_chosen_however_short_the_queue() -> None:
    ctl = _controller()
    assert ctl.decide(1, now=0.0).stitch == 2  # idle: the most accurate
    now = _steady(ctl, 300.0, 2.0)  # 300 images/s: the dear rung serves 195
    d = ctl.decide(1, now=now)
    assert d.stitch == 1 and "images/s" in d.reason  # the queue alone (1 image, 9 ms) would have kept it on the dear rung
    assert ctl.predict(2, 1) < 0.8 * 200


def test_the_controller_steps_down_before_the_ring_fills() -> None:
    # a ring of 64 images, 40 queued, arrivals at 1,000 images/s: the mid rung takes 5 batches x 13 ms to serve the queue,
    # in which 65 images arrive for 24 places: the cheap one (25 ms, 25 images) it is, though the SLO would allow the mid one
    ctl = _controller(max_queue=64)
    now = _steady(ctl, 1000.0, 0.3, start=10.0)
    assert ctl.predict(1, 40) < 0.8 * 200 and ctl.fits(1, 40, 0.0, ctl.rates(now), 0.8) is False
    assert ctl.decide(40, now=now).stitch == 0
    assert _controller().decide(40, now=now).stitch == 1  # by the SLO alone (no ring, no arrival seen), the mid one
    with pytest.raises(ServeError, match="max_queue >= max_batch"):
        ControllerConfig(50.0, 8, max_queue=4)
    with pytest.raises(ServeError, match="rate_windows"):
        ControllerConfig(50.0, 8, rate_windows=(2.0, 1.0))


def test_after_a_burst_it_climbs_straight_to_the_most_accurate_rung_with_room() -> None:
    ctl = _controller(max_queue=64, up_after=2)
    now = _steady(ctl, 1000.0, 0.3)
    assert ctl.decide(40, now=now).stitch == 0
    later = now + 5.0  # the burst is long over: both averages near nothing
    picks = [ctl.decide(1, recent_ms=[10.0] * 10, now=later).stitch for _ in range(3)]
    assert picks == [0, 2, 2]  # after up_after decisions with room on every limit, straight to the top
