#!/usr/bin/env python3
"""Measure what the final norm on stitched ViT routes changes: snnet's route mode against the reference's.

The reference DeiT code ends a stitched route with the target's ``forward_head`` alone; snnet's
default ends it with the target's own tail, final LayerNorm included (``route_mode="reference"``
runs it the reference's way). This script takes the shipped Fashion-MNIST family's SN-Net, fits its
stitching layers by least squares, optionally trains it ``--steps`` steps in one route mode, and
evaluates every network of the same weights in both modes on the validation split (10,000 images,
never the test set): what a network trained one way scores when run the other way, e.g. a converted
reference checkpoint run with snnet's default.

    nice -n 10 python scripts/measure_route_modes.py --steps 0 --out /tmp/modes-init.json
    nice -n 10 python scripts/measure_route_modes.py --steps 1000 --train-mode reference --out /tmp/modes.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from snnet import create_snnet
from snnet.data import build_dataset, make_loader
from snnet.evaluate import evaluate
from snnet.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="training steps after the least-squares fit (0: none)")
    parser.add_argument("--train-mode", choices=("snnet", "reference"), default="reference")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = create_snnet("fmnist", pretrained=True, route_mode=args.train_mode)
    cfg = net.anchors[0].data_config
    net.init_stitching(make_loader(build_dataset("fashion-mnist", "train", cfg, limit=100), 100, shuffle=False),
                       max_images=100)
    if args.steps:
        config = TrainConfig().override(seed=args.seed, progress=False, tensorboard=False, device="cpu", lr=args.lr,
                                        lr_base_batch=None, warmup_steps=args.steps // 10)  # the rate as given
        trainer = Trainer(net, config, total_steps=args.steps)
        train = build_dataset("fashion-mnist", "train", cfg, augment=True, seed=args.seed)
        batches = itertools.chain.from_iterable(make_loader(train, args.batch_size, shuffle=True, seed=args.seed + e,
                                                            drop_last=True) for e in itertools.count())
        net.train()
        for _, (x, y) in zip(range(args.steps), batches):
            trainer.step(x, y)
    val = make_loader(build_dataset("fashion-mnist", "val", cfg), 500, shuffle=False)
    scores = {}
    for mode in ("snnet", "reference"):
        run = net if mode == args.train_mode else create_snnet("fmnist", route_mode=mode)
        if run is not net:
            run.load_state_dict(net.state_dict())
        scores[mode] = {r.name: r.acc1 for r in evaluate(run, val, progress=False) if not r.is_anchor}
    diff = [scores["snnet"][n] - scores["reference"][n] for n in scores["snnet"]]
    summary = {"settings": vars(args) | {"out": str(args.out)}, "stitched_networks": len(diff),
               "mean_top1": {m: statistics.mean(s.values()) for m, s in scores.items()},
               "snnet_minus_reference": {"mean": statistics.mean(diff), "min": min(diff), "max": max(diff)},
               "acc1": scores}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    trained = f"trained {args.steps} steps in the {args.train_mode} mode" if args.steps else "least-squares fit only"
    print(f"{len(diff)} stitched networks ({trained}), mean top-1 on val: snnet mode "
          f"{summary['mean_top1']['snnet']:.2f} %, reference mode {summary['mean_top1']['reference']:.2f} %; "
          f"snnet - reference per network: mean {statistics.mean(diff):+.2f}, min {min(diff):+.2f}, "
          f"max {max(diff):+.2f} points")


if __name__ == "__main__":
    main()
