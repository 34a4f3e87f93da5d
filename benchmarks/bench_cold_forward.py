"""Why a served one-image forward is slower than the model alone's: the same forward, warm and cold.

`bench_serve_overhead.py` measures a one-image request's overhead as the server's p50 minus the
model alone's p50, the model alone running its forwards back to back. In the server a forward
follows HTTP work and a wait for the next request, and is slower for it (docs/serving.md, "One
image: the latency path"). This script measures that part alone, in one process, with the served
forward on one image, eager (:func:`snnet.deploy.serve.engine.probabilities`: select, the route,
softmax, as the model process runs it) and compiled (:class:`snnet.deploy.serve.inline.RouteGraphs`:
an ONNX Runtime session where onnxruntime is installed, else a TorchScript graph, as the latency
path runs it), for the smallest and the largest anchor, each forward preceded by:

* nothing (back to back: the goal's reference);
* ``--pause-ms`` of sleep (the core idles, as a server's does between requests);
* the same time spinning (the core stays busy; caches stay as they were);
* writing ``--touch-mb`` MiB (the data caches cool);
* ``--pause-ms`` of other Python work (parsing and building JSON and dicts: code and data the
  forward does not use, as a request's HTTP handling is).

The conditions alternate in ``--rounds`` rounds (this machine's speed drifts between few-second
windows), each figure the median over rounds of the p50; the ratios to back to back are printed
side by side.

    python benchmarks/bench_cold_forward.py            # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable


def p50_ms(forward: Callable[[], Any], before: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        before()
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="saved network (default: the shipped family, random stitching layers)")
    ap.add_argument("--pause-ms", type=float, default=0.4, help="sleep / spin before each forward (a server waits ~0.3 ms between one client's requests)")
    ap.add_argument("--touch-mb", type=float, default=4.0, help="MiB written before each forward in the cooled condition")
    ap.add_argument("--forwards", type=int, default=400, help="forwards per condition and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import os

    import torch

    from snnet.commands.deploy import _load
    from snnet.deploy.serve.engine import probabilities
    from snnet.deploy.serve.inline import RouteGraphs
    from snnet.model import StitchedNet

    torch.set_num_threads(1)  # as the server process's latency path
    net = (StitchedNet.from_pretrained(args.model) if args.model else _load(None, trained=False)).eval()
    anchors = sorted((c for c in net.costs() if c.is_anchor), key=lambda c: c.flops)
    junk = bytearray(int(args.touch_mb * 2**20))
    pause = args.pause_ms / 1e3

    def spin() -> None:
        end = time.perf_counter() + pause
        while time.perf_counter() < end:
            pass

    def touch() -> None:
        junk[::64] = b"\x01" * len(junk[::64])  # one write per cache line

    doc = json.dumps({f"k{i}": [i, str(i), {"v": i / 3}] for i in range(200)})

    def other_work() -> None:
        end = time.perf_counter() + pause
        while time.perf_counter() < end:
            json.loads(doc)

    conditions: dict[str, Callable[[], None]] = {"back to back": lambda: None, f"after {args.pause_ms:g} ms asleep": lambda: time.sleep(pause),
                                                 f"after {args.pause_ms:g} ms spinning": spin, f"after writing {args.touch_mb:g} MiB": touch,
                                                 f"after {args.pause_ms:g} ms of other Python work": other_work}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; one torch thread; {args.rounds} rounds x {args.forwards} forwards")
    graphs = RouteGraphs(net)  # the latency path's forward: each stitch compiled
    for anchor in (anchors[0], anchors[-1]):
        x = torch.randn(1, *net.input_size)
        a = x.numpy()  # the latency path's input: the images as the server process decodes them
        graphs.trace(anchor.id)
        forwards = {"eager (the model process's)": lambda: probabilities(net, anchor.id, x),
                    f"compiled, {graphs.runtime.get(anchor.id, 'eager')} (the latency path's)": lambda: graphs.probabilities(anchor.id, a)}
        for kind, forward in forwards.items():
            for _ in range(50):
                forward()
            per: dict[str, list[float]] = {name: [] for name in conditions}
            for _ in range(args.rounds):
                for name, before in conditions.items():
                    per[name].append(p50_ms(forward, before, args.forwards))
            base = statistics.median(per["back to back"])
            cells = [f"{name} {statistics.median(v):.3f} ms ({statistics.median(v) / base:.2f}x)" for name, v in per.items()]
            print(f"{anchor.name:>14} {kind} one-image forward p50: " + "; ".join(cells))
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
