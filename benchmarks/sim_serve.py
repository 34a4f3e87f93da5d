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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_serve import verdict  # the benchmark's own judgement of the goal

from snnet.deploy import loadgen
from snnet.deploy.simulate import load_bursty, simulate, summarise
from snnet.errors import SnnetError


def run(path: str, slowdown: float) -> list[str]:
    b = load_bursty(path)
    acc = {r.id: float(r.acc1) for r in b.rungs}  # type: ignore[arg-type]
    lines = [f"#### {Path(path).parent.name} (simulated{f', slowdown {slowdown:g}' if slowdown != 1 else ''})", "",
             f"SLO {b.slo_ms:.1f} ms, max batch {b.max_batch}, max queue {b.max_queue} images, {b.images} image(s) a request, "
             f"{len(b.rungs)} rungs" + ("; latency table: full batch only, part-full batches proportional" if b.full_batch_only else ""), "",
             "| trace | best pinned rung reaching 99 % | last-second | controller | goal |", "|---|---|---|---|---|"]
    for name in loadgen.TRACES:
        times, _ = loadgen.trace(name, b.capacity, b.seconds, b.rate_x, b.ramp_peak, b.seed)
        runs = {}
        for policy, make in b.policies().items():
            s = summarise(simulate(make(), times, b.images, b.max_queue, slowdown), acc, b.slo_ms)
            runs[policy] = {"summary": {"attainment": s.attainment, "mean_acc1": s.mean_acc1, "rejected": s.rejected}}
        v = verdict(runs)
        cell = lambda s: f"{100 * s['attainment']:.1f} % at {s['mean_acc1']:.2f} ({s['rejected']} 503)"  # noqa: E731
        best = (f"{v['best_pinned_99'][len('pinned '):]}: {cell(runs[v['best_pinned_99']]['summary'])}"
                if v["best_pinned_99"] else "none")
        lines.append(f"| {name} ({len(times)} requests) | {best} | {cell(runs['last-second']['summary'])} | "
                     f"{cell(runs['controller']['summary'])} | {'met' if v['met'] else 'not met' if v['met'] is False else 'n/a'} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bursty.json files of bench_serve.py runs")
    ap.add_argument("--slowdown", type=float, default=1.0, help="the model's time over its table's (a busier machine)")
    args = ap.parse_args()
    try:
        for path in args.runs:
            print("\n".join(run(path, args.slowdown)))
    except SnnetError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
