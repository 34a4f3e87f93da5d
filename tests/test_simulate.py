"""The simulated model process (snnet.deploy.simulate): its mechanics on hand-checked cases, and the
stitch policies on the bursty benchmark's four traces over a synthetic 3-rung ladder (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snnet.deploy import loadgen
from snnet.deploy.controller import ControllerConfig, LatencyTable, StitchController, make_policy
from snnet.deploy.simulate import Clairvoyant, KnowsLevel, Noise, load_bursty, simulate, summarise
from snnet.errors import ServeError, SnnetError
from snnet.results import Row

RUNGS = [Row(0, "cheap", 100, acc1=80.0), Row(1, "mid", 300, acc1=83.0), Row(2, "dear", 1000, acc1=86.0)]


def _table(per_image: dict[int, float], overhead: float = 1.0, sizes=(1, 2, 4, 8)) -> LatencyTable:
    return LatencyTable({k: tuple((b, overhead + c * b) for b in sizes) for k, c in per_image.items()})


def _pinned(rung: int, table: LatencyTable, config: ControllerConfig) -> StitchController:
    p = StitchController(RUNGS, table, config)
    p.pin(RUNGS[rung])
    return p


def test_batches_whole_requests_as_soon_as_the_model_is_free() -> None:
    table = _table({0: 1.0, 1: 1.0, 2: 1.0})  # 1 + b ms
    pol = _pinned(0, table, ControllerConfig(slo_ms=100.0, max_batch=4))
    out = simulate(pol, [0.0, 0.0, 0.0, 0.001, 0.0015], images=1, max_queue=8)
    # the first three start together at 0 and take 4 ms; the next two wait for them and run as one batch of 2 (3 ms)
    assert [round(s.ms, 6) for s in out] == [4.0, 4.0, 4.0, 6.0, 5.5]
    assert {s.stitch for s in out} == {0}
    # a slower machine: every batch takes twice the table's time
    assert [round(s.ms, 6) for s in simulate(_pinned(0, table, ControllerConfig(100.0, 4)), [0.0, 0.0], 1, 8, slowdown=2.0)] == [6.0, 6.0]


def test_noise_draws_batch_times_around_the_table_and_adds_time_the_policy_is_not_told_of() -> None:
    """Noise: each batch's time lognormal around the table's (seeded), and time outside the model process added to the
    answers only: the latencies the policy reads (the evidence it steps down on) stay the model process's own."""
    table = _table({0: 1.0, 1: 1.0, 2: 1.0})
    times = [0.01 * k for k in range(400)]  # one request every 10 ms, each a batch of its own of 2 ms by the table

    def run(noise: Noise) -> list[float]:
        return [s.ms for s in simulate(_pinned(0, table, ControllerConfig(100.0, 4)), times, 1, 8, noise=noise)]

    assert run(Noise()) == [pytest.approx(2.0)] * 400
    batch = run(Noise(batch=0.1, seed=1))
    assert batch == run(Noise(batch=0.1, seed=1)) != run(Noise(batch=0.1, seed=2))  # seeded
    ratios = sorted(ms / 2.0 for ms in batch)
    assert 0.97 < ratios[200] < 1.03 and 0.8 < ratios[20] < 0.9 and 1.1 < ratios[380] < 1.25  # median 1, about 10 % each way
    outside = run(Noise(outside_ms=5.0, seed=1))
    assert min(outside) >= 2.0 and 6.0 < sum(outside) / 400 < 8.0  # 2 ms of model, 5 ms outside it on average

    class Reads(StitchController):  # the latencies decide is given, as the engine gives its own
        seen: list[float] = []

        def decide(self, queue, oldest_wait_ms=0.0, recent_ms=(), now=None, arrivals=None, upstream=()):
            self.seen.extend(recent_ms)
            return super().decide(queue, oldest_wait_ms, recent_ms, now, arrivals, upstream)

    reads = Reads(RUNGS[:1], table, ControllerConfig(100.0, 4))
    answered = simulate(reads, times[:50], 1, 8, noise=Noise(outside_ms=50.0, seed=3))
    assert max(s.ms for s in answered) > 60.0 and reads.seen and max(reads.seen) == pytest.approx(2.0)
    with pytest.raises(ServeError, match="need noise batch >= 0 and outside_ms >= 0"):
        Noise(batch=-0.1)


def test_a_full_ring_answers_503_and_a_batch_holds_its_room_until_it_ends() -> None:
    table = _table({0: 10.0, 1: 10.0, 2: 10.0})  # a batch of 2 images: 21 ms
    pol = _pinned(0, table, ControllerConfig(slo_ms=100.0, max_batch=2))
    # requests of 2 images into a ring of 4: the first runs at once (holding 2 until 21 ms), the second waits, the third finds no room;
    # the fourth comes after the first batch ended and finds room again
    out = simulate(pol, [0.0, 0.001, 0.002, 0.022], images=2, max_queue=4)
    assert [s.ms is None for s in out] == [False, False, True, False]
    s = summarise(out, {0: 80.0}, slo_ms=30.0)
    # only the first within 30 ms: the second waits 20 ms for it, the fourth 20 ms for the second
    assert s.sent == 4 and s.rejected == 1 and s.attainment == 0.25 and s.p95_ms == pytest.approx(41.0)
    with pytest.raises(ServeError, match="fits neither"):
        simulate(pol, [0.0], images=3, max_queue=4)


def test_load_bursty_reads_a_runs_settings_and_table(tmp_path) -> None:
    run = {"settings": {"max_batch": 4, "max_queue": 16, "images_per_request": 1, "seconds": 24.0, "rate_x": 1.3,
                        "ramp_peak": 2.5, "seed": 0},
           "slo_ms": 5000.0, "largest_capacity_rps": 3.6,
           "ladder": [{"id": 0, "name": "a", "acc1": 70.0, "full_batch_ms": 200.0},
                      {"id": 5, "name": "b", "acc1": 80.0, "full_batch_ms": 800.0}]}
    path = tmp_path / "bursty.json"
    path.write_text(json.dumps(run))
    b = load_bursty(path)
    assert b.full_batch_only and [r.id for r in b.rungs] == [0, 5] and b.max_queue == 16
    assert b.table.predict(5, 4) == 800.0 and b.table.predict(5, 1) == 200.0  # part-full batches: proportional
    run["ladder"][1]["latency_ms_by_batch"] = [[1, 300.0], [4, 800.0]]
    run["ladder"][0]["latency_ms_by_batch"] = [[1, 60.0], [4, 200.0]]
    path.write_text(json.dumps(run))
    b = load_bursty(path)
    assert not b.full_batch_only and b.table.predict(5, 1) == 300.0
    assert set(b.policies()) == {"pinned a", "pinned b", "last-second", "controller"}
    assert b.policies(utilisation=0.9)["controller"]().config.utilisation == 0.9  # another controller setting (sim_serve --set)
    assert b.server == {} and b.policies()["controller"]().config.utilisation == ControllerConfig.utilisation
    assert b.policies()["controller"]().config.headroom == ControllerConfig.headroom
    # the server's --utilisation (the DeiT runs since 2026-12-06) and --headroom: replayed as the run had them
    run["settings"] |= {"utilisation": 1.0, "headroom": 0.95}
    path.write_text(json.dumps(run))
    b = load_bursty(path)
    for name in ("controller", "pinned a"):
        assert (b.policies()[name]().config.utilisation, b.policies()[name]().config.headroom) == (1.0, 0.95)
    assert b.policies(utilisation=0.75)["controller"]().config.utilisation == 0.75  # --set still changes it
    assert b.policies(headroom=0.8)["controller"]().config.headroom == 0.8
    assert b.measured_slowdown == {}  # runs before 2026-12-06 recorded none
    run["summaries"] = {"ramp": {"pinned a": {"table_slowdown": 1.1}, "pinned b": {"table_slowdown": 1.3},
                                 "controller": {"table_slowdown": 1.2}, "last-second": {}}}
    path.write_text(json.dumps(run))
    assert load_bursty(path).measured_slowdown == {"ramp": 1.2}  # the median over the servers that recorded it
    with pytest.raises(ServeError, match="not a controller setting"):
        b.policies(slo_ms=100.0)
    path.write_text("{}")
    with pytest.raises(ServeError, match="bench_serve.py writes one"):
        load_bursty(path)


def test_the_trace_generator_is_the_benchmarks_and_the_simulation_deterministic() -> None:
    times, rate = loadgen.trace("gamma-cv4", capacity=100.0, seconds=5.0, seed=3)
    assert times == loadgen.gamma_times(130.0, 4.0, 5.0, 3) and rate(1.0) == 130.0
    ramp, rate = loadgen.trace("ramp", capacity=100.0, seconds=5.0)
    assert ramp == loadgen.ramp_times(20.0, 250.0, 5.0, 0) and rate(2.5) == pytest.approx(250.0)
    with pytest.raises(ValueError, match="unknown trace"):
        loadgen.trace("poisson", 1.0, 1.0)
    table = _table({0: 0.5, 1: 1.5, 2: 5.0})
    config = ControllerConfig(slo_ms=50.0, max_batch=8, max_queue=64)
    runs = [simulate(make_policy("controller", RUNGS, table, config), times, 2, 64) for _ in range(2)]
    assert runs[0] == runs[1]


# =============================================================================== the policies on the benchmark's traces

# the bursty benchmark's setting in small: SLO 4 x the dearest rung's full batch, traces at 1.3 x its capacity
# (the ramp from 0.2 x to 2.5 x), requests of 2 images, a ring of 8 x max_batch images (bench_serve's default)
TABLE = _table({0: 0.5, 1: 1.5, 2: 5.0})  # full batch of 8: 5, 13 and 41 ms
SLO = 4 * TABLE.predict(2, 8)
CAPACITY = 8 / TABLE.predict(2, 8) * 1e3 / 2  # requests/s the dear rung serves
ACC = {r.id: float(r.acc1) for r in RUNGS}  # type: ignore[arg-type]


def _runs(trace: str) -> dict[str, tuple[float, float, int]]:
    """Attainment, mean top-1 and 503s of every rung pinned, the last-second policy and the controller on ``trace``."""
    times, _ = loadgen.trace(trace, CAPACITY, seconds=10.0)
    config = ControllerConfig(SLO, 8, max_queue=64)
    policies = {f"pinned {r.name}": _pinned(r.id, TABLE, config) for r in RUNGS}
    policies |= {n: make_policy(n, RUNGS, TABLE, config) for n in ("last-second", "controller")}
    out = {}
    for name, policy in policies.items():
        s = summarise(simulate(policy, times, 2, 64), ACC, SLO)
        out[name] = (s.attainment, s.mean_acc1, s.rejected)
    return out


@pytest.mark.parametrize("trace", ["gamma-cv1", "gamma-cv4", "gamma-cv8", "ramp"])
def test_the_controller_beats_the_best_pinned_rung_that_reaches_99(trace: str) -> None:
    # on CV² 8 the mid rung pinned sheds 14 requests of a burst (98.9 %), so the best rung at 99 % is the cheap one;
    # the controller before met the goal on the other three traces and not on this one: one request of 1233 found
    # the ring full (26 images within one 13 ms batch of the mid rung, where its one-SLO average read ~470 images/s)
    runs = _runs(trace)
    good = [v for k, v in runs.items() if k.startswith("pinned") and v[0] >= 0.99]
    best = max(good, key=lambda v: v[1])
    att, acc, _ = runs["controller"]
    assert att >= best[0] and acc > best[1], (runs, best)
    assert runs["pinned dear"][0] < 0.5  # the dearest rung alone is overloaded: the controller uses it only in lulls
    if trace == "gamma-cv8":
        assert att == 1.0 and acc > runs["pinned cheap"][1] + 2 and att > runs["last-second"][0] + 0.3


def test_the_controller_keeps_a_small_ring_from_filling() -> None:
    # DeiT's setting (issue 20): one image a request, batches of 4 that take hundreds of ms, a ring of 16 images.
    # The controller without the rate limits stayed on the most accurate rungs while the queue fit the SLO and shed
    # 27-34 % of the requests with 503s once the ring filled. This one answers the ramp whole; on CV² 8 a burst of
    # 14 requests within one 490 ms batch (twice the pace it plans the ring for) costs it 2 requests of 222
    rungs = [Row(0, "ti", 1, acc1=72.0), Row(1, "s", 2, acc1=79.5), Row(2, "sb", 3, acc1=81.0), Row(3, "b", 4, acc1=82.0)]
    table = LatencyTable({k: ((1, v / 4), (4, v)) for k, v in {0: 180.0, 1: 365.0, 2: 650.0, 3: 1030.0}.items()})
    slo = 4 * 1030.0
    for trace, floor in (("gamma-cv8", 0.99), ("ramp", 1.0)):
        times, _ = loadgen.trace(trace, 4 / 1.03, 40.0)
        served = simulate(make_policy("controller", rungs, table, ControllerConfig(slo, 4, max_queue=16)), times, 1, 16)
        s = summarise(served, {r.id: float(r.acc1) for r in rungs}, slo)  # type: ignore[arg-type]
        assert s.attainment >= floor and s.rejected <= 2 and s.mean_acc1 > 77.0 and s.stitches >= 3, (trace, s)


def test_the_clairvoyant_policy_steps_down_before_a_burst_it_knows_of() -> None:
    # two rungs, a batch of 4 at most, a ring of 4: one lone request at 0, then a burst of 4 at 5 ms. The dear rung
    # (40 ms a batch) on the lone request would hold the burst's 4 images behind it in a ring with 3 places free;
    # the cheap one (4 ms) has ended when the burst comes. The clairvoyant policy knows, so it runs the lone request cheap and
    # the burst, with nothing behind it, dear
    rungs = [Row(0, "cheap", 1, acc1=70.0), Row(1, "dear", 2, acc1=80.0)]
    table = LatencyTable({0: ((1, 4.0), (4, 4.0)), 1: ((1, 40.0), (4, 40.0))})
    config = ControllerConfig(slo_ms=100.0, max_batch=4, max_queue=4)
    times = [0.0, 0.005, 0.005, 0.005, 0.005]
    knows = Clairvoyant(rungs, table, config, times, images=1)
    assert knows.fallback == 0  # the dear rung pinned refuses a request of the burst: the cheap one is the safe fallback
    out = simulate(knows, times, images=1, max_queue=4)
    assert [s.stitch for s in out] == [0, 1, 1, 1, 1] and all(s.ms is not None and s.ms <= 100.0 for s in out)
    dear = StitchController(rungs, table, config)
    dear.pin(rungs[1])
    assert [s.ms is None for s in simulate(dear, times, images=1, max_queue=4)] == [False, False, False, False, True]
    with pytest.raises(ServeError, match="needs the clock"):
        Clairvoyant(rungs, table, config, times, images=1).decide(1)


@pytest.mark.parametrize("trace", ["gamma-cv1", "gamma-cv8"])
def test_the_clairvoyant_policy_never_misses_where_its_fallback_does_not_and_serves_at_least_as_well(trace: str) -> None:
    times, _ = loadgen.trace(trace, CAPACITY, seconds=10.0)
    config = ControllerConfig(SLO, 8, max_queue=64)
    knows = Clairvoyant(RUNGS, TABLE, config, times, images=2)
    fallback = summarise(simulate(_pinned(knows.fallback, TABLE, config), times, 2, 64), ACC, SLO)
    assert fallback.attainment == 1.0  # the synthetic ladder's safe rung exists on both traces
    s = summarise(simulate(knows, times, 2, 64), ACC, SLO)
    assert s.attainment == 1.0 and s.rejected == 0 and s.mean_acc1 >= fallback.mean_acc1 and s.stitches >= 2, (trace, s)


@pytest.mark.parametrize("trace", ["gamma-cv4", "ramp"])
def test_the_controller_told_the_level_plans_on_the_most_accurate_rung_that_holds_the_trace_pinned(trace: str) -> None:
    """KnowsLevel (sim_serve.py --knows-level) asks whether knowing the level would close the gap between the controller
    and the clairvoyant policy: its level must be the rung that holds the trace pinned and the next one up must not,
    and the level must be what it plans the rest of a queue on, where the controller plans on the rate."""
    times, _ = loadgen.trace(trace, CAPACITY, seconds=10.0)
    config = ControllerConfig(SLO, 8, max_queue=64)
    told = KnowsLevel(RUNGS, TABLE, config, times, images=2, slowdown=1.2)
    assert told.level == Clairvoyant(RUNGS, TABLE, config, times, images=2, slowdown=1.2).fallback
    holds = [summarise(simulate(_pinned(k, TABLE, config), times, 2, 64, slowdown=1.2), ACC, SLO) for k in range(len(RUNGS))]
    assert holds[told.level].attainment == 1.0 and holds[told.level].rejected == 0
    assert told.level == len(RUNGS) - 1 or holds[told.level + 1].attainment < 1.0 or holds[told.level + 1].rejected > 0
    assert told.level < len(RUNGS) - 1  # the dear rung, pinned, misses on these traces: the level is below it
    plain = StitchController(RUNGS, TABLE, config)
    assert plain.fallback_rung(0.0, 1.0, 0) == len(RUNGS) - 1  # no arrivals: the controller plans on the top rung
    assert told.fallback_rung(0.0, 1.0, 0) == told.level  # told the level, on the level whatever the rate
    s = summarise(simulate(told, times, 2, 64, slowdown=1.2), ACC, SLO)
    assert s.sent == len(times) and s.stitches >= 2


def test_the_bursty_benchmark_pins_the_rungs_that_could_reach_99_percent() -> None:
    """When not every rung fits in the run, the ones pinned are both ends and the most accurate
    that can keep up with ~the mean rate: the best pinned rung at 99 % is then among them."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_serve import contenders

    rungs = [SimpleNamespace(id=k, name=f"r{k}") for k in range(10)]  # least accurate first
    rates = {k: 10.0 - k for k in range(10)}  # requests/s: the accurate rungs are slow
    # mean rate 4, margins safest first, then boldest, inwards: capacity >= 8 (rungs 0-2) -> 2; >= 3.2 (0-6) -> 6;
    # >= 6.4 (0-3) -> 3; >= 4 (0-6) -> 5; >= 5 (0-5) -> 4
    assert [r.id for r in contenders(rungs, 5, rates, mean_rate=4.0)] == [0, 2, 3, 6, 9]
    # two places besides the ends: the safest and the boldest (the bold two alone left the bursty traces judged
    # against the cheapest rung: a DeiT run pinned 4 of 39, no deit_small)
    assert [r.id for r in contenders(rungs, 4, rates, mean_rate=4.0)] == [0, 2, 6, 9]
    assert [r.id for r in contenders(rungs, 7, rates, mean_rate=4.0)] == [0, 2, 3, 4, 5, 6, 9]
    assert [r.id for r in contenders(rungs, 5, rates, mean_rate=50.0)] == [0, 2, 4, 7, 9]  # none able: evenly spaced
    assert contenders(rungs, 10, rates, 5.0) == rungs


def test_the_bursty_overview_puts_every_server_of_every_trace_on_one_table(tmp_path, capsys, monkeypatch) -> None:
    """``bench_serve.py --render DIR`` prints the README's table from a run's bursty.json: a row per
    server (one missing from a trace is a dash), the best pinned rung at 99 % marked, the verdicts."""
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    def run(att: float, acc: float) -> dict:
        return {"attainment": att, "mean_acc1": acc}

    summaries = {"cv1": {"pinned a": run(1.0, 80.0), "pinned b": run(0.995, 82.5), "controller": run(1.0, 83.0)},
                 "ramp": {"pinned a": run(0.9, 80.0), "controller": run(0.98, 81.0)}}
    saved = {"summaries": summaries, "verdicts": {
        t: bench_serve.verdict({n: {"summary": s} for n, s in runs.items()}) for t, runs in summaries.items()}}
    (tmp_path / "bursty.json").write_text(json.dumps(saved))
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--render", str(tmp_path)])
    bench_serve.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| server | cv1: attainment %, top-1 % | ramp: attainment %, top-1 % |"
    assert lines[2:] == ["| pinned a | 100.0, 80.00 | 90.0, 80.00 |",
                         "| pinned b | 99.5, 82.50 (best at 99 %) | — |",
                         "| controller | 100.0, 83.00 | 98.0, 81.00 |",
                         "| goal | met | no pinned rung reaches 99 % |"]


def test_the_bursty_benchmark_keeps_the_last_traces_files_when_stopped_mid_write(tmp_path, monkeypatch) -> None:
    """bench_serve.py rewrites its files after every trace so that a run stopped early keeps what it measured;
    SIGTERM exits at once, so a stop during a rewrite truncated bursty.json (everything measured so far) in place."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    def summary(att: float) -> dict:
        return {"sent": 10, "attainment": att, "mean_acc1": 80.0, "goodput_img_s": 1.0, "p50_ms": 1.0, "p95_ms": 2.0,
                "p99_ms": 3.0, "rejected_503": 0, "timeouts_or_errors": 0, "stitches": [0]}

    results = {"ramp": {"pinned a": {"summary": summary(1.0), "samples": []}, "controller": {"summary": summary(1.0), "samples": []}}}
    table = LatencyTable({0: ((1, 1.0), (4, 2.0))})
    args = SimpleNamespace(max_batch=4)
    rungs = [Row(0, "a", 100, acc1=80.0)]
    bench_serve.write(tmp_path, results, args, 10.0, "a", 5.0, 6.5, rungs, table, [0.1, 0.2])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_write_text = Path.write_text

    def stopped(self: Path, data: str, *a, **k) -> int:  # the SIGTERM handler's SystemExit, part-way through a file
        real_write_text(self, data[: len(data) // 3])
        raise SystemExit(143)

    monkeypatch.setattr(Path, "write_text", stopped)
    results["cv1"] = results["ramp"]
    with pytest.raises(SystemExit):
        bench_serve.write(tmp_path, results, args, 10.0, "a", 5.0, 6.5, rungs, table, [0.1, 0.2])
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "bursty.json").read_text())["summaries"]["ramp"]["controller"]["attainment"] == 1.0
    del sys.modules["bench_serve"]


def test_sim_serve_refuses_seeds_that_are_not_numbers_in_one_line(monkeypatch) -> None:
    # `--seeds 0,x` was a ValueError traceback from int(); the script's other bad input is one "error:" line
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sim_serve

    monkeypatch.setattr(sys, "argv", ["sim_serve.py", "--seeds", "0,x", "bursty.json"])
    with pytest.raises(SystemExit, match=r"^error: --seeds 0,x: give comma-separated whole numbers"):
        sim_serve.main()


def test_the_bursty_overview_of_a_folder_without_a_run_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    # `bench_serve.py --render DIR` on a folder with no (or another) bursty.json was a FileNotFoundError traceback
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--render", str(tmp_path)])
    with pytest.raises(SystemExit, match="no bursty run's bursty.json there .FileNotFoundError"):
        bench_serve.main()
    (tmp_path / "bursty.json").write_text("{}")
    with pytest.raises(SystemExit, match="no bursty run's bursty.json there .KeyError"):
        bench_serve.main()


def test_the_bursty_benchmark_refuses_a_model_that_is_not_a_saved_network_in_one_line(tmp_path, monkeypatch) -> None:
    # `bench_serve.py --model FOLDER` with no network there ended in a CheckpointError traceback
    import runpy
    import signal
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    handler = signal.getsignal(signal.SIGTERM)  # the script sets its own
    try:
        with pytest.raises(SystemExit, match=r"^error: .*missing is not a saved stitched network"):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_the_bursty_benchmark_checks_pinned_before_it_profiles(tmp_path, monkeypatch) -> None:
    # `--pinned x` was read by int() only after the network was loaded and profiled (minutes): a ValueError traceback then
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    for bad in ("x", "0", "-2"):
        monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--pinned", bad, "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
        with pytest.raises(SystemExit, match=rf"^--pinned {bad}: give 'all' or how many rungs"):
            bench_serve.main()


def test_a_controller_setting_of_the_wrong_shape_is_a_serve_error(tmp_path) -> None:
    # sim_serve.py --set utilisation=0.5,1 (a pair for a number) or burst=2 (a number for a pair) was a TypeError
    # traceback from the controller's checks; sim_serve turns a ServeError into one line
    run = {"settings": {"max_batch": 4, "max_queue": 16, "images_per_request": 1, "seconds": 4.0, "rate_x": 1.3,
                        "ramp_peak": 2.5, "seed": 0},
           "slo_ms": 5000.0, "largest_capacity_rps": 3.0, "ladder": [{"id": 0, "name": "a", "acc1": 70.0, "full_batch_ms": 200.0}]}
    (tmp_path / "bursty.json").write_text(json.dumps(run))
    b = load_bursty(tmp_path / "bursty.json")
    with pytest.raises(ServeError, match=r"utilisation=\(0.5, 1.0\): give one number"):
        b.policies(utilisation=(0.5, 1.0))
    with pytest.raises(ServeError, match="burst=2.0: give two numbers, burst=A,B"):
        b.policies(burst=2.0)
    with pytest.raises(ServeError, match="steady=0.5: give two numbers"):
        b.policies(steady=0.5)
    assert b.policies(burst=(0.025, 1.0), utilisation=0.9)["controller"]().config.burst == (0.025, 1.0)


def test_a_slowdown_or_server_stage_that_is_not_a_time_is_refused() -> None:
    # sim_serve.py --slowdown -1 gave batches of negative time (latencies of -40 ms: every SLO met), --server-ms -5 the same
    table = _table({0: 1.0, 1: 1.0, 2: 1.0})
    for bad in ({"slowdown": -1.0}, {"slowdown": 0.0}, {"server_ms": -5.0}, {"slowdown": float("nan")}):
        with pytest.raises(ServeError, match="need slowdown > 0 and server_ms >= 0"):
            simulate(_pinned(0, table, ControllerConfig(100.0, 4)), [0.0, 0.0], 1, 8, **bad)


def test_the_bursty_benchmark_checks_trace_names_before_it_profiles(tmp_path, monkeypatch) -> None:
    # an unknown --traces name was found only when the traces were drawn, after the profile, probe and warm-up (minutes)
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--traces", "gamma-cv1,gamma-cvx", "--model", str(tmp_path / "missing"),
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^--traces gamma-cv1,gamma-cvx: unknown trace 'gamma-cvx'"):
        bench_serve.main()


def _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue: int) -> tuple[Any, str]:
    """benchmarks/sim_serve.py as a module, and a bursty.json of two rungs (DeiT-like: batches of 4, an image a request)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sim_serve

    run = {"settings": {"max_batch": 4, "max_queue": max_queue, "images_per_request": 1, "seconds": 6.0, "rate_x": 1.3,
                        "ramp_peak": 2.5, "seed": 0},
           "slo_ms": 4 * 800.0, "largest_capacity_rps": 5.0,
           "ladder": [{"id": 0, "name": "a", "acc1": 70.0, "latency_ms_by_batch": [[1, 60.0], [4, 200.0]]},
                      {"id": 5, "name": "b", "acc1": 80.0, "latency_ms_by_batch": [[1, 300.0], [4, 800.0]]}]}
    path = tmp_path / "bursty.json"
    path.write_text(json.dumps(run))
    return sim_serve, str(path)


def test_sim_serve_prints_the_clairvoyant_policy_beside_the_policies(tmp_path, monkeypatch) -> None:
    sim_serve, path = _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue=16)
    lines = sim_serve.run(path, 1.0, clairvoyant=True)
    rows = [line for line in lines if line.startswith("| gamma") or line.startswith("| ramp")]
    assert "clairvoyant (knows the future)" in lines[4] and len(rows) == 4
    assert all(row.count("|") == 7 and row.rstrip(" |").endswith("503)") for row in rows), rows  # one more cell a trace
    assert "clairvoyant" not in "\n".join(sim_serve.run(path, 1.0))


def test_sim_serve_prints_the_controller_told_the_level_and_counts_it(tmp_path, monkeypatch) -> None:
    sim_serve, path = _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue=16)
    tally: dict[str, int] = {}
    lines = sim_serve.run(path, 1.0, seeds=[0, 1], knows_level=True, clairvoyant=True, tally=tally)
    rows = [line for line in lines if line.startswith("| gamma") or line.startswith("| ramp")]
    assert "| knows the level: goal | clairvoyant (knows the future) |" in lines[4] and len(rows) == 8
    said = [row.split("|")[6].strip() for row in rows]  # the knows-the-level cell, after the controller's goal
    assert all(cell.endswith(": met") or cell.endswith(": not met") or cell.endswith(": n/a") for cell in said), said
    assert tally["knows the level"] == sum(cell.endswith(": met") for cell in said) and "clairvoyant" in tally
    assert f"the controller told the level meets it on {tally['knows the level']}" in lines[-2]
    assert "knows the level" not in "\n".join(sim_serve.run(path, 1.0))


def test_sim_serve_replays_another_ring_for_every_server(tmp_path, monkeypatch) -> None:
    """sim_serve.py --max-queue: the DeiT benchmark's ring was chosen by replaying its runs with larger ones."""
    import re

    sim_serve, path = _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue=4)

    def refused(lines: list[str]) -> int:  # every 503 of every server and trace
        return sum(int(n) for line in lines for n in re.findall(r"\((\d+) 503\)", line))

    small, large = sim_serve.run(path, 1.0), sim_serve.run(path, 1.0, max_queue=64)
    assert "max queue 4 images" in small[2] and "max queue 64 images" in large[2]
    assert refused(small) > 0 and refused(large) < refused(small)  # a ring of one batch refuses bursts that 64 places hold
    with pytest.raises(SnnetError, match="--max-queue 2: the ring must hold at least a batch"):
        sim_serve.run(path, 1.0, max_queue=2)


def test_sim_serve_adds_noise_and_counts_over_runs_and_slowdowns(tmp_path, monkeypatch, capsys) -> None:
    """sim_serve.py --noise/--outside-ms: what the table does not say (the DeiT benchmark's --headroom was chosen on
    replays with it); --slowdown 1,1.1 with two runs: each in turn, and a count over all."""
    import re
    import sys

    sim_serve, path = _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue=16)
    quiet, noisy = sim_serve.run(path, 1.0), sim_serve.run(path, 1.0, noise=Noise(0.2, 400.0))
    assert "noise: batches 0.2 (log sd), 400 ms outside the model (mean)" in noisy[0] and "noise:" not in quiet[0]
    assert noisy[4:] != quiet[4:] and noisy[4:] == sim_serve.run(path, 1.0, noise=Noise(0.2, 400.0, seed=9))[4:]  # each trace's seed
    tally: dict[str, int] = {}
    sim_serve.run(path, 1.0, seeds=[0, 1], tally=tally)
    assert tally["traces"] == 8 and 0 <= tally["short"] <= tally["traces"] - tally["met"]
    monkeypatch.setattr(sys, "argv", ["sim_serve.py", "--slowdown", "1,1.1", "--noise", "0.1", path, path])
    sim_serve.main()
    out = capsys.readouterr().out
    assert out.count("#### ") == 4 and out.count("slowdown 1.1") == 2
    counted = re.search(r"In all \(2 run\(s\), slowdown 1,1.1\): goal met on (\d+) of 16 traces", out)
    assert counted is not None
    monkeypatch.setattr(sys, "argv", ["sim_serve.py", "--slowdown", "1,x", path])
    with pytest.raises(SystemExit, match="--slowdown 1,x: give a number"):
        sim_serve.main()


def test_sim_serve_replays_each_trace_as_slow_as_the_run_measured_it(tmp_path, monkeypatch) -> None:
    """sim_serve.py --slowdown measured: the runs record the policy's measured time over the table's (table_slowdown);
    a replay on the table's own times had pinned rungs holding traces they lost in the run."""
    sim_serve, path = _sim_serve_and_a_tiny_run(tmp_path, monkeypatch, max_queue=16)
    with pytest.raises(SnnetError, match="records no measured slowdown for every trace"):
        sim_serve.run(path, "measured")
    with pytest.raises(SnnetError, match="--slowdown fast: give a number"):
        sim_serve.run(path, "fast")
    run = json.loads(Path(path).read_text())
    run["summaries"] = {t: {"controller": {"table_slowdown": 2.0}} for t in loadgen.TRACES}
    Path(path).write_text(json.dumps(run))
    measured, doubled = sim_serve.run(path, "measured"), sim_serve.run(path, 2.0)
    assert "slowdown measured (gamma-cv1 2.00" in measured[0]
    assert measured[4:] == doubled[4:]  # every trace replayed at 2x: the same rows as --slowdown 2
    assert measured[4:] != sim_serve.run(path, 1.0)[4:]


def test_the_bursty_summary_tells_late_answers_the_server_saw_from_those_late_outside_it(monkeypatch) -> None:
    """A late answer whose time the server's own clock (first bytes read to the answer) has within the SLO lost it
    outside the server process, where no policy of the server sees: the summary counts both kinds."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serve

    def answer(ms: float, server_ms: float | None) -> dict:
        return {"t": 0.0, "ms": ms, "status": 200, "images": 1, "stitch": 0, "before_ring_ms": 1.0, "server_ms": server_ms}

    samples = [answer(5.0, 4.0), answer(25.0, 24.0), answer(25.0, 15.0), answer(30.0, None),
               {"t": 0.0, "ms": 1.0, "status": 503, "images": 1, "stitch": None}]
    s = bench_serve.summarise(samples, {0: 80.0}, slo_ms=20.0, seconds=1.0)
    assert (s["within_slo"], s["late"], s["late_by_server_clock"]) == (1, 3, 1)
    assert s["attainment"] == 0.2 and s["rejected_503"] == 1
