"""Shared-prefix evaluation of a whole stitch space vs the naive loop (select + forward per stitch).

Same network, same data, same run: the Fashion-MNIST family (random init: weights do not change
the work done) on synthetic 28x28 images. Prints both times (wall and CPU), their ratio, the ratio
of multiply-accumulates, and how far the two disagree on top-1 (they must not).

    python benchmarks/bench_eval.py            # 2,000 images, batch 500
    python benchmarks/bench_eval.py --quick    # 400 images, batch 200
"""

from __future__ import annotations

import argparse
import time

import torch

import snnet
from snnet.commands.options import DEFAULT_ANCHORS, split_names
from snnet.evaluate import evaluate


def naive(net: snnet.StitchedNet, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, float]:
    """Top-1 of every stitch the obvious way: one full forward per stitch and batch."""
    hits = {s.id: 0 for s in net.space}
    with torch.inference_mode():
        for x, y in batches:
            for s in net.space:
                net.select(s)
                logits = net(x)
                hits[s.id] += int((logits.argmax(-1) == y).sum())
                torch.nn.functional.cross_entropy(logits, y)  # the loss evaluate() also computes
    n = sum(len(y) for _, y in batches)
    return {k: 100.0 * v / n for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (one gives the steadiest ratio on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="400 images, batch 200")
    args = ap.parse_args()
    if args.quick:
        args.images, args.batch_size = 400, 200
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = snnet.create_snnet(split_names(DEFAULT_ANCHORS)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, *net.input_size, generator=g)
    y = torch.randint(0, net.num_classes, (args.images,), generator=g)
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, args.images, args.batch_size)]
    n = len(net.space)
    print(f"{n} networks ({len(net.anchors)} anchors), {args.images} images of {tuple(net.input_size)}, "
          f"batch {args.batch_size}, {args.threads} threads")

    warm = [(x[:8], y[:8])]  # warm-up (allocator, kernels) for both
    evaluate(net, warm, progress=False)
    naive(net, warm)

    # Batches alternate between the two ways (and which goes first), so a shared machine's changing
    # load hits both alike; CPU time (this process only) is reported beside wall time for the same reason.
    wall, cpu, hits = {"shared": 0.0, "naive": 0.0}, {"shared": 0.0, "naive": 0.0}, {"shared": {}, "naive": {}}
    for k, (bx, by) in enumerate(batches):
        order = ("shared", "naive") if k % 2 == 0 else ("naive", "shared")
        for way in order:
            t, c = time.perf_counter(), time.process_time()
            if way == "shared":
                acc = {r.id: r.acc1 for r in evaluate(net, [(bx, by)], progress=False)}
            else:
                acc = naive(net, [(bx, by)])
            wall[way] += time.perf_counter() - t
            cpu[way] += time.process_time() - c
            for i, a in acc.items():
                hits[way][i] = hits[way].get(i, 0.0) + a * len(by) / 100

    # the work each way, in multiply-accumulates per image: every stitch's full route, vs each anchor
    # once plus every stitch's own stitching layer, suffix and head
    costs, parts = net.costs(), net.part_costs()
    macs_naive = sum(c.flops for c in costs)
    macs_shared = macs_naive - sum(parts[s.src].route(0, s.src_end, stem=True, head=False)[0]
                                   for s in net.space if not s.is_anchor)
    diff = max(abs(hits["shared"][i] - hits["naive"][i]) for i in hits["naive"])
    for way, label in (("shared", "shared prefixes"), ("naive", "naive loop")):
        print(f"{label + ':':16s} {wall[way]:7.2f} s wall, {cpu[way]:7.2f} s CPU  "
              f"({args.images * n / wall[way]:,.0f} network-images/s)")
    print(f"MACs per image:  {macs_shared / 1e6:.1f}M shared vs {macs_naive / 1e6:.1f}M naive "
          f"({macs_naive / macs_shared:.2f}x less work)")
    print(f"speed-up:        {wall['naive'] / wall['shared']:.2f}x wall, {cpu['naive'] / cpu['shared']:.2f}x CPU "
          f"(top-1 hits differ by at most {diff:.0f} images)")


if __name__ == "__main__":
    main()
