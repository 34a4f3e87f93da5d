#!/usr/bin/env python3
"""Measure what the reference's updates of parameters no route used do to SN-Net training.

The reference code trains on PyTorch before 2.0, whose ``zero_grad`` keeps zero gradients: once a block or
stitching layer has been on a route, every later step decays it and moves it on its momentum, used or
not. snnet's steps move only what the step's route used. This script trains the shipped Fashion-MNIST
family's SN-Net twice from the same start — same stitches drawn, same images, same order — once as
snnet steps (``optim.unused_updates: skip``) and once as the reference does (``reference``:
:func:`snnet.reference.stale_zero_grads` before every optimizer step), then evaluates every network of
both on the validation split (10,000 images, never the test set) and compares them network by network.

    nice -n 10 python scripts/measure_stale_updates.py --steps 600 --out /tmp/stale.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from snnet import create_snnet
from snnet.data import build_dataset, make_loader
from snnet.evaluate import evaluate
from snnet.train import TrainConfig, Trainer


def run(arm: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    net = create_snnet("fmnist", pretrained=True)
    cfg = net.anchors[0].data_config
    calib = build_dataset("fashion-mnist", "train", cfg, limit=100)
    net.init_stitching(make_loader(calib, 100, shuffle=False), max_images=100)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # the same settings in both arms but optim.unused_updates: the rate as given (not scaled by the batch)
    config = TrainConfig().override(seed=args.seed, progress=False, tensorboard=False, device="cpu", lr=args.lr,
                                    lr_base_batch=None, weight_decay=args.weight_decay, warmup_steps=args.steps // 10,
                                    unused_updates="reference" if arm == "reference" else "skip")
    trainer = Trainer(net, config, total_steps=args.steps)
    filled: list[int] = []
    train = build_dataset("fashion-mnist", "train", cfg, augment=True, seed=args.seed)
    batches = itertools.chain.from_iterable(make_loader(train, args.batch_size, shuffle=True, seed=args.seed + e,
                                                        drop_last=True) for e in itertools.count())
    t0 = time.perf_counter()
    net.train()
    for _, (x, y) in zip(range(args.steps), batches):
        trainer.step(x, y)
        filled.append(trainer.unused_stepped)
    seconds = time.perf_counter() - t0
    val = build_dataset("fashion-mnist", "val", cfg)
    rows = evaluate(net, make_loader(val, 500, shuffle=False), progress=False)
    moved = {}
    for k, v in net.state_dict().items():
        if v.is_floating_point() and k.startswith("stitch_layers.") and k.endswith("proj.weight"):
            moved[k] = float((v - start[k]).norm() / start[k].norm())
    return {"arm": arm, "seconds": seconds, "acc1": {r.name: r.acc1 for r in rows},
            "stale_grads_per_step": statistics.mean(filled) if filled else 0,
            "stitching_layer_relative_change": statistics.mean(moved.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = [run(arm, args) for arm in ("snnet", "reference")]
    ours, theirs = (a["acc1"] for a in arms)
    diff = [theirs[n] - ours[n] for n in ours]
    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "arms": arms,
        "networks": len(diff),
        "mean_top1": {a["arm"]: statistics.mean(a["acc1"].values()) for a in arms},
        "reference_minus_snnet": {"mean": statistics.mean(diff), "min": min(diff), "max": max(diff),
                                  "better": sum(d > 0 for d in diff), "worse": sum(d < 0 for d in diff)},
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for a in arms:
        print(f"{a['arm']:>9}: mean top-1 {summary['mean_top1'][a['arm']]:.2f} % over {len(diff)} networks, "
              f"{a['seconds']:.0f} s, {a['stale_grads_per_step']:.1f} zero-filled parameters a step, stitching "
              f"layers moved {100 * a['stitching_layer_relative_change']:.2f} % (relative norm)")
    d = summary["reference_minus_snnet"]
    print(f"reference - snnet per network: mean {d['mean']:+.2f}, min {d['min']:+.2f}, max {d['max']:+.2f} points; "
          f"{d['better']} better, {d['worse']} worse")


if __name__ == "__main__":
    main()
