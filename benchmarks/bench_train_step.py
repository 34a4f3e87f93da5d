"""Overhead of training through the stitched network vs the same route as a plain nn.Sequential.

One training step = select (stitched only) + forward + cross-entropy + backward + AdamW step.
Both models share the very same modules; the plain one just calls them in a row without the
StitchedNet wrapper. Repetitions are interleaved (stitched, plain, stitched, ...) so machine
load hits both alike, and the medians are compared.

    .venv/bin/python benchmarks/bench_train_step.py            # fmnist family, batch 64, CPU
    .venv/bin/python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import snnet
from snnet.commands.options import DEFAULT_ANCHORS, split_names
from snnet.train import route_modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", default=DEFAULT_ANCHORS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stitch", default=None, help="stitch id or name (default: the middle of the space)")
    ap.add_argument("--quick", action="store_true", help="5 repetitions, for a smoke run")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = snnet.create_snnet(split_names(args.anchors))  # random init: speed does not depend on weights
    stitch = net.select(args.stitch if args.stitch is not None else len(net.space) // 2)
    plain = nn.Sequential(*route_modules(net, stitch))  # the same module objects, no wrapper
    x = torch.randn(args.batch_size, *net.input_size)
    y = torch.randint(net.num_classes, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    opt_net = torch.optim.AdamW(net.parameters(), lr=1e-5)  # training optimises the whole net
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-5)

    def step_net() -> None:
        net.select(stitch)
        opt_net.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt_net.step()

    def step_plain() -> None:
        opt_plain.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()
        opt_plain.step()

    times: dict[str, list[float]] = {"stitched": [], "plain": []}
    for i in range(args.warmup + reps):
        for name, fn in (("stitched", step_net), ("plain", step_plain)):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"route: {stitch.name} (id {stitch.id}), batch {args.batch_size}, {args.threads} thread(s), "
          f"{reps} interleaved reps, median of each")
    for k in ("stitched", "plain"):
        print(f"  {k:9s} {med[k] * 1e3:8.2f} ms/step  {args.batch_size / med[k]:8.0f} img/s")
    print(f"  ratio stitched/plain: {med['stitched'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
