"""A full garbage collection in a process that serves, before and after :func:`snnet.deploy.heap.freeze_heap`.

A serving process holds torch, timm, the network and (on the latency path) a compiled graph per
stitch. CPython's collector walks all of it in each full (generation-2) collection, and while it
does the process answers nothing: with a 20 ms SLO a 150 ms pause misses every request in
flight. ``snnet serve`` freezes its heap once loaded (both processes). This script loads what a
server process does for the shipped family (the network, every stitch compiled as the latency
path compiles it), then times full collections before and after the freeze, side by side
in one process, and prints both and their ratio.

    python benchmarks/bench_heap.py          # ~30 s
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time


def full_collection_ms(repeats: int) -> float:
    """The median time of ``repeats`` full collections, ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="full collections timed on each side")
    ap.add_argument("--stitches", type=int, default=None, help="compile only the first N stitches (default: all)")
    args = ap.parse_args()

    import torch

    from snnet.deploy.heap import freeze_heap
    from snnet.deploy.serve.inline import RouteGraphs
    from snnet.model import network_from_config
    from snnet.recipes import recipe_config

    torch.set_num_threads(1)
    t = time.perf_counter()
    demo = recipe_config("demo-blocks")  # the serving benchmarks' network: the shipped family, its weights, the recipe's stitches
    net = network_from_config(demo.model, demo.space).eval()
    graphs = RouteGraphs(net, max_images=1)
    ids = [s.id for s in net.space][: args.stitches]  # every stitch: the ladder depends on accuracies
    graphs.trace(*ids)
    runtimes = sorted(set(graphs.runtime.values()))
    print(f"loaded the shipped family's network and compiled {len(graphs.graphs)} of {len(ids)} stitches "
          f"({', '.join(runtimes) or 'none'}) in {time.perf_counter() - t:.1f} s; {len(gc.get_objects())} objects tracked")
    gc.collect()
    before = full_collection_ms(args.repeats)
    frozen = freeze_heap()
    after = full_collection_ms(args.repeats)
    print(f"full collection, median of {args.repeats}: {before:.1f} ms before the freeze, {after * 1e3:.1f} µs after "
          f"({frozen} objects frozen): {before / max(after, 1e-6):,.0f}x shorter")


if __name__ == "__main__":
    main()
