"""The bursty benchmark's traces replayed on a simulated model process: every policy, in CPU seconds.

Reads a bursty run's ``bursty.json`` (``benchmarks/bench_serve.py`` writes it: the ladder with
each rung's top-1 and latency table, the SLO, ``--max-batch``, ``--max-queue``, the measured
capacity and the trace settings), draws the same four traces (:func:`snnet.deploy.loadgen.trace`,
same seed) and runs each through :func:`snnet.deploy.simulate.simulate` with every rung pinned,
the last-second policy and the controller. Prints, per trace, the best pinned rung reaching 99 %
attainment, both policies' attainment and mean served top-1, and the goal's verdict as the
benchmark judges it (its own ``verdict``). A simulation: no HTTP, decoding or noise (see the module).

    python benchmarks/sim_serve.py docs/serve/bursty-deit/bursty.json docs/serve/bursty-fmnist/bursty.json
    python benchmarks/sim_serve.py --slowdown 1.5 docs/serve/bursty-fmnist/bursty.json   # the model 1.5x slower than its table
    python benchmarks/sim_serve.py --slowdown measured RUN/bursty.json   # each trace as slow as the run measured it
    python benchmarks/sim_serve.py --seeds 0,1,2,3 docs/serve/bursty-deit/bursty.json    # the same settings, four draws of each trace
    python benchmarks/sim_serve.py --set utilisation=0.9 docs/serve/bursty-deit/bursty.json   # another controller setting
    python benchmarks/sim_serve.py --server-ms 1.9 docs/serve/bursty-fmnist/bursty.json   # a server stage of 1.9 ms a request before the ring
    python benchmarks/sim_serve.py --clairvoyant docs/serve/bursty-deit/bursty.json   # and a policy that knows the arrivals to come
    python benchmarks/sim_serve.py --knows-level --slowdown measured RUN/bursty.json   # and the controller told the level only
    python benchmarks/sim_serve.py --max-queue 64 --set utilisation=1 docs/serve/bursty-deit/bursty.json   # another ring, for every server
    python benchmarks/sim_serve.py --noise 0.05 --outside-ms 30 RUN/bursty.json   # batch times 5 % around the table's, 30 ms outside
    python benchmarks/sim_serve.py --slowdown 1,1.1,1.2 --seeds 0,1,2,3 RUN1/bursty.json RUN2/bursty.json   # and a count over all

``--noise`` and ``--outside-ms`` add what the table does not say (:class:`snnet.deploy.simulate.Noise`, drawn with each trace's
seed): batch times drawn around the table's, and time outside the model process on each answer, which the policies are not
told of. With them, a setting that plans close to the SLO pays for it in late answers, as on a real machine.

``--clairvoyant`` adds a column: :class:`snnet.deploy.simulate.Clairvoyant`, a policy that knows every arrival to
come (no server stage): not one a server can run, but what foresight reaches. Where it meets the goal, the goal can be
met; a controller that falls short there falls short for not knowing when the next burst comes.

``--knows-level`` adds another: :class:`snnet.deploy.simulate.KnowsLevel`, the controller told only the level the
clairvoyant policy falls back to (the most accurate rung that, pinned, answers the whole trace), which it plans the
rest of each queue on. Where it does no better than the controller, the level is not what the controller lacks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_serve import verdict  # the benchmark's own judgement of the goal

from snnet.deploy import loadgen
from snnet.deploy.controller import ControllerConfig
from snnet.deploy.simulate import Clairvoyant, KnowsLevel, Noise, load_bursty, simulate, summarise
from snnet.errors import SnnetError


def run(path: str, slowdown: float | str, seeds: list[int] | None = None, settings: dict[str, Any] | None = None,
        server_ms: float | None = None, clairvoyant: bool = False, max_queue: int | None = None, noise: Noise = Noise(),
        tally: dict[str, int] | None = None, knows_level: bool = False) -> list[str]:
    """The table of one bursty run, on its own trace seed or on each of ``seeds`` (then a row per trace and seed,
    and a last line that counts the goal over them); ``settings``: ControllerConfig values other than the server's;
    ``server_ms``: the server stage's work per request (default: what the run measured, else none); ``clairvoyant``:
    a column for :class:`~snnet.deploy.simulate.Clairvoyant` (what foresight reaches; run without the server stage);
    ``max_queue``: another ring than the run's, in images, for every server alike. ``slowdown``: the model's time over
    its table's, or ``"measured"``: each trace's as the run measured it (its servers' median, ``table_slowdown``).
    ``noise``: what the table does not say (its seed replaced by each trace's); ``tally``: counts added to (traces, goal
    met, controller short of the best pinned rung's attainment, and the goal met by each knowing policy), for a total over
    several runs. ``knows_level``: a column for :class:`~snnet.deploy.simulate.KnowsLevel`, the controller told the level
    the clairvoyant policy falls back to (with the server stage and noise, as the controller)."""
    b = load_bursty(path)
    if slowdown == "measured" and not all(name in b.measured_slowdown for name in loadgen.TRACES):
        raise SnnetError(f"{path} records no measured slowdown for every trace (bench_serve.py runs record it since "
                         "2026-12-06): give --slowdown a number, e.g. 1.1")
    elif slowdown != "measured" and not isinstance(slowdown, (int, float)):
        raise SnnetError(f"--slowdown {slowdown}: give a number (the model's time over its table's) or 'measured'")
    if max_queue is not None:
        if max_queue < b.max_batch:
            raise SnnetError(f"--max-queue {max_queue}: the ring must hold at least a batch ({b.max_batch} images)")
        b = replace(b, max_queue=max_queue)
    server_ms = (b.server_ms or 0.0) if server_ms is None else server_ms
    acc = {r.id: float(r.acc1) for r in b.rungs}  # type: ignore[arg-type]
    seeds = seeds or [b.seed]
    extra = "".join(f", {k} {v}" for k, v in (settings or {}).items())
    if noise.batch or noise.outside_ms:
        extra += f", noise: batches {noise.batch:g} (log sd), {noise.outside_ms:g} ms outside the model (mean)"
    stage = f", server {server_ms:g} ms a request" if server_ms else ""
    said = ("measured (" + ", ".join(f"{n} {b.measured_slowdown[n]:.2f}" for n in loadgen.TRACES) + ")"
            if slowdown == "measured" else f"{slowdown:g}")
    lines = [f"#### {Path(path).parent.name} (simulated{f', slowdown {said}' if slowdown != 1 else ''}{stage}{extra})", "",
             f"SLO {b.slo_ms:.1f} ms, max batch {b.max_batch}, max queue {b.max_queue} images, {b.images} image(s) a request, "
             f"{len(b.rungs)} rungs" + ("; latency table: full batch only, part-full batches proportional" if b.full_batch_only else ""), "",
             "| trace | best pinned rung reaching 99 % | last-second | controller | goal |" + (" knows the level: goal |" if knows_level else "")
             + (" clairvoyant (knows the future) |" if clairvoyant else ""),
             "|---|---|---|---|---|" + ("---|" if knows_level else "") + ("---|" if clairvoyant else "")]
    met, short = [], 0
    knowing_met: dict[str, list[bool | None]] = {"knows the level": [], "clairvoyant": []}
    config = b.config(**(settings or {}))  # the controller's, as the policies below are given it
    for seed in seeds:
        for name in loadgen.TRACES:
            times, _ = loadgen.trace(name, b.capacity, b.seconds, b.rate_x, b.ramp_peak, seed)
            slow = b.measured_slowdown[name] if slowdown == "measured" else float(slowdown)
            runs = {}
            for policy, make in b.policies(**(settings or {})).items():
                s = summarise(simulate(make(), times, b.images, b.max_queue, slow, server_ms, replace(noise, seed=seed)), acc,
                              b.slo_ms)
                runs[policy] = {"summary": {"attainment": s.attainment, "mean_acc1": s.mean_acc1, "rejected": s.rejected}}
            v = verdict(runs)
            met.append(v["met"])
            short += bool(v["best_pinned_99"]) and runs["controller"]["summary"]["attainment"] < v["best_attainment"]
            cell = lambda s: f"{100 * s['attainment']:.1f} % at {s['mean_acc1']:.2f} ({s['rejected']} 503)"  # noqa: E731
            best = (f"{v['best_pinned_99'][len('pinned '):]}: {cell(runs[v['best_pinned_99']]['summary'])}"
                    if v["best_pinned_99"] else "none")
            label = name + (f", seed {seed}" if len(seeds) > 1 else "")
            bound = ""
            if knows_level:
                told = KnowsLevel(b.rungs, b.table, config, times, b.images, slow)
                k = vars(summarise(simulate(told, times, b.images, b.max_queue, slow, server_ms, replace(noise, seed=seed)), acc,
                                   b.slo_ms))
                knowing_met["knows the level"].append(verdict(runs | {"controller": {"summary": k}})["met"])
                bound += f" {cell(k)}: {goal(knowing_met['knows the level'][-1])} |"
            if clairvoyant:
                knows = Clairvoyant(b.rungs, b.table, ControllerConfig(b.slo_ms, b.max_batch, max_queue=b.max_queue), times,
                                    b.images, slow)
                k = vars(summarise(simulate(knows, times, b.images, b.max_queue, slow), acc, b.slo_ms))
                bound += f" {cell(k)} |"
                knowing_met["clairvoyant"].append(verdict(runs | {"controller": {"summary": k}})["met"])  # the goal, judged of it
            lines.append(f"| {label} ({len(times)} requests) | {best} | {cell(runs['last-second']['summary'])} | "
                         f"{cell(runs['controller']['summary'])} | {goal(v['met'])} |{bound}")
    met_count = sum(m is True for m in met)
    knowing = {name: sum(m is True for m in ms) for name, ms in knowing_met.items() if ms}
    if tally is not None:
        for key, count in (("traces", len(met)), ("met", met_count), ("short", short), *knowing.items()):
            tally[key] = tally.get(key, 0) + count
    if len(seeds) > 1:
        lines += ["", f"Seeds {', '.join(map(str, seeds))}: goal met on {met_count} of {len(met)} traces; "
                      f"the controller's attainment under the best pinned rung's on {short}" + knew(knowing) + "."]
    return lines + [""]


def goal(met: bool | None) -> str:
    """The goal's verdict in a cell: met, not met, or n/a (no pinned rung reaches 99 %)."""
    return "met" if met else "not met" if met is False else "n/a"


def knew(met: dict[str, int]) -> str:
    """'; the controller told the level meets it on N; the clairvoyant policy on M' for the knowing policies replayed."""
    said = {"knows the level": "the controller told the level meets it on {}", "clairvoyant": "the clairvoyant policy meets it on {}"}
    return "".join(f"; {said[name].format(n)}" for name, n in met.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bursty.json files of bench_serve.py runs")
    ap.add_argument("--slowdown", default="1", help="the model's time over its table's (a busier machine), or 'measured': "
                                                     "each trace's as the run measured it (runs since 2026-12-06); "
                                                     "comma-separated: each in turn, and a count over all")
    ap.add_argument("--noise", type=float, default=0.0, help="standard deviation of the log of each batch's time over the "
                                                              "table's (0.05: most within 5 %%); default 0: none")
    ap.add_argument("--outside-ms", type=float, default=0.0, help="mean of an exponential time outside the model process "
                                                                   "added to each answer, not told to the policies; default 0")
    ap.add_argument("--server-ms", type=float, default=None, help="the server process's work per request before the ring "
                                                                  "(default: what the run measured, server_work_ms, else 0: none)")
    ap.add_argument("--seeds", default=None, help="comma-separated trace seeds to replay instead of the run's own (one trace "
                                                  "is one sample)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a controller setting other than the server's (snnet.deploy.controller.ControllerConfig), e.g. "
                         "utilisation=0.9 or burst=0.025,1.0; repeatable")
    ap.add_argument("--max-queue", type=int, default=None, help="the ring in images, for every server alike (default: the run's)")
    ap.add_argument("--clairvoyant", action="store_true", help="add a policy that knows every arrival to come: what "
                                                                   "foresight reaches (no server stage; ~20 s a Fashion-MNIST trace)")
    ap.add_argument("--knows-level", action="store_true", help="add the controller told the level the clairvoyant policy "
                                                                 "falls back to (the most accurate rung that pinned answers the "
                                                                 "whole trace): is the level what the controller lacks?")
    args = ap.parse_args()
    settings: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            numbers = tuple(float(v) for v in value.split(","))
        except ValueError:
            sys.exit(f"error: --set {item}: give NAME=NUMBER or NAME=NUMBER,NUMBER")
        settings[name] = numbers[0] if len(numbers) == 1 else numbers
    try:
        slowdowns: list[float | str] = [v if v == "measured" else float(v) for v in args.slowdown.split(",")]
    except ValueError:
        sys.exit(f"error: --slowdown {args.slowdown}: give a number (the model's time over its table's), 'measured', or "
                 "several, comma-separated")
    try:
        seeds = [int(k) for k in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds}: give comma-separated whole numbers, e.g. 0,1,2,3")
    tally: dict[str, int] = {}
    try:
        noise = Noise(args.noise, args.outside_ms)
        for path in args.runs:
            for slowdown in slowdowns:
                print("\n".join(run(path, slowdown, seeds, settings, args.server_ms, args.clairvoyant, args.max_queue, noise,
                                     tally, args.knows_level)))
    except SnnetError as e:
        sys.exit(f"error: {e}")
    if len(args.runs) * len(slowdowns) > 1:
        knowing = {name: tally[name] for name in ("knows the level", "clairvoyant") if name in tally}
        print(f"In all ({len(args.runs)} run(s), slowdown {args.slowdown}): goal met on {tally['met']} of {tally['traces']} "
              f"traces; the controller's attainment under the best pinned rung's on {tally['short']}" + knew(knowing) + ".")


if __name__ == "__main__":
    main()
