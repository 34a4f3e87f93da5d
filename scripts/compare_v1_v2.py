#!/usr/bin/env python
"""SN-Net v1 against SN-Netv2's options and KLAS, under one training budget, on one family.

Every variant starts from the same pretrained anchors and trains with the same recipe (the
demo's until it cut inside blocks, ``snnet/recipes/demo-blocks.yaml``: least-squares init on 100 images, AdamW with warm-up and
cosine decay, anchors at a tenth of the stitching layers' learning rate, distillation from the
largest anchor) for the same number of steps, batch size, learning rate and seed. The variants:

* ``v1``: SN-Net (paired windows small->large, full stitching layers, uniform sampling);
* every combination of SN-Netv2's three options on top: ``2way`` (two-way space with round
  trips), ``lora`` (low-rank stitching layers), ``ros`` (resource-constrained sampling), up
  to ``2way+lora+ros`` (SN-Netv2 as published);
* ``klas``: the stitches KLAS keeps (as many as v1 has), full layers, uniform sampling.

Each is evaluated on ``--split`` (all its networks, shared prefixes); the script writes one
plot with every variant's Pareto frontier (``frontiers.png``), a table (``summary.md``,
``summary.json``: frontier size, widest frontier gap as a share of the anchors' FLOPs range,
the mean difference of its frontier from v1's and from the Fashion-MNIST zoo's at matched FLOPs
over the anchors' range (:func:`snnet.results.compare_fronts`), each anchor's drift from before
training) and each variant's ``results.json``. A variant whose
``results.json`` exists is read back, not retrained (delete it to redo).

    python scripts/compare_v1_v2.py --out runs/compare                       # the full comparison
    python scripts/compare_v1_v2.py --steps 100 --eval-limit 500 --out /tmp/cmp   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snnet.config import ROS_GAP, ModelConfig, SpaceConfig
from snnet.data import build_dataset, make_loader
from snnet.demo import frontier_gap
from snnet.evaluate import evaluate
from snnet.klas import klas
from snnet.model import StitchedNet, network_from_config
from snnet.recipes import recipe_config
from snnet.report import table
from snnet.results import compare_fronts, load_results, write_results
from snnet.train import train

DEMO = recipe_config("demo-blocks")  # the recipe every variant trains with (its steps, batch size and rate are the defaults here)

OPTIONS = ("2way", "lora", "ros")
VARIANTS = ["v1"] + ["+".join(c) for n in (1, 2, 3) for c in itertools.combinations(OPTIONS, n)] + ["klas"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="fmnist", help="anchors: a family name or comma-separated timm names (default: the shipped fmnist family)")
    p.add_argument("--data", default="fashion-mnist", help="dataset name or folder (snnet.data.build_dataset)")
    p.add_argument("--data-dir", default=None, help="where the dataset lives")
    p.add_argument("--split", default="test", help="the split every variant is evaluated (and compared) on")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=DEMO.schedule.max_steps, help="training steps of every variant")
    p.add_argument("--batch-size", type=int, default=DEMO.data.batch_size)
    p.add_argument("--lr", type=float, default=DEMO.optim.lr, help="learning rate of the stitching layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=4, help="rank of the low-rank stitching layers (lora variants)")
    p.add_argument("--lora-alpha", type=float, default=1.0, help="the low-rank update is scaled by alpha / rank")
    p.add_argument("--ros-gap", type=float, default=ROS_GAP, help="ROS group gap, as a share of the space's FLOPs range")
    p.add_argument("--klas-images", type=int, default=256, help="calibration images KLAS scores on")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images of the split")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="download timm weights (default: only snnet's shipped fmnist family loads its weights)")
    p.add_argument("--out", default="runs/compare_v1_v2")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def build(args: argparse.Namespace, variant: str, routes: tuple[str, ...] | None = None) -> StitchedNet:
    """A fresh network of the pretrained anchors with this variant's space and stitching layers."""
    opts = set(variant.split("+"))
    torch.manual_seed(args.seed)  # stitching layers (and low-rank A) start the same in every run
    space = SpaceConfig(two_way="2way" in opts, routes=routes, lora_rank=args.lora_rank if "lora" in opts else 0,
                        lora_alpha=args.lora_alpha)
    return network_from_config(ModelConfig(anchors=args.family, pretrained=args.pretrained), space)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Train and evaluate every variant; its summary rows, and the anchors' top-1 before training."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    base = build(args, "v1")
    data_config = base.anchors[0].data_config
    train_set = build_dataset(args.data, "train", data_config, limit=args.train_limit, root=args.data_dir, seed=args.seed)
    split = build_dataset(args.data, args.split, data_config, limit=args.eval_limit, root=args.data_dir, seed=args.seed)
    loader = make_loader(split, args.eval_batch_size, shuffle=False)
    anchors = [s.id for s in base.space.anchor_stitches()]
    before = {r.name: r.acc1 for r in evaluate(base, loader, anchors, progress=progress)}
    v1_stitches = len(base.space) - len(base.anchors)
    print(f"anchors on {args.split} before training: " + ", ".join(f"{k} {v:.2f}%" for k, v in before.items()))

    rows = []
    for variant in args.variants.split(","):
        vdir = out / variant
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if (vdir / "results.json").is_file():
            results = load_results(vdir / "results.json")
            info = json.loads((vdir / "variant.json").read_text()) if (vdir / "variant.json").is_file() else {}
            print(f"{variant}: read {vdir / 'results.json'}")
        else:
            routes = None
            if variant == "klas":
                calib = make_loader(build_dataset(args.data, "train", data_config, limit=args.klas_images,
                                                  root=args.data_dir, seed=args.seed), 64, shuffle=True, seed=args.seed)
                chosen = klas(base, calib, keep=v1_stitches, max_images=args.klas_images, progress=progress)
                routes = chosen.routes
                vdir.mkdir(parents=True, exist_ok=True)
                (vdir / "klas.json").write_text(json.dumps(chosen.to_dict(), indent=2) + "\n")
            net = build(args, variant, routes)
            config = DEMO.override(out_dir=str(vdir / "train"), max_steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, progress=progress, ros_gap=args.ros_gap,
                                   sampler="ros" if "ros" in variant.split("+") else "uniform")
            res = train(net, train_set, config)
            results = evaluate(net, loader, progress=progress)
            write_results(results, vdir)
            info = {"variant": variant, "networks": len(net.space), "stitching_layers": len(net.stitch_layers),
                    "trainable_stitching_params": sum(p.numel() for p in net.stitch_layers.parameters() if p.requires_grad),
                    "train_seconds": round(res.seconds, 1), "seconds": round(time.perf_counter() - t0, 1)}
            (vdir / "variant.json").write_text(json.dumps(info, indent=2) + "\n")
        after = {r.name: r.acc1 for r in results if r.is_anchor}
        rows.append({**info, "variant": variant, "networks": len(results), "frontier": sum(r.pareto for r in results),
                     "gap": frontier_gap(results), "best": max(r.acc1 for r in results),
                     "drift": {k: after[k] - before[k] for k in before}, "results": results})
    _compare(rows, args)
    return rows, before


def _compare(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Each variant's frontier against v1's and the zoo's at matched FLOPs, over the anchors' range."""
    zoo = None
    if args.family == "fmnist" and args.data == "fashion-mnist" and args.split in ("val", "test") and not args.eval_limit:
        from snnet.zoo import load_zoo

        zoo = load_zoo("fmnist", split=args.split)
    v1 = next((row["results"] for row in rows if row["variant"] == "v1"), None)
    for row in rows:
        anchors = [r.flops for r in row["results"] if r.is_anchor]
        lo, hi = min(anchors), max(anchors)
        row["vs_v1"] = compare_fronts(row["results"], v1, lo=lo, hi=hi).mean if v1 is not None else None
        # and between each pair of neighbouring anchors: where a variant fills what v1 leaves thin
        cuts = sorted(anchors)
        row["vs_v1_by_region"] = [compare_fronts(row["results"], v1, lo=a, hi=b).mean
                                  for a, b in zip(cuts, cuts[1:])] if v1 is not None else None
        if zoo is not None:
            c = compare_fronts(row["results"], zoo, lo=lo, hi=hi)
            row["vs_zoo"], row["vs_zoo_worst"], row["vs_zoo_ahead"] = c.mean, c.worst.diff, c.ahead


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def plot(rows: list[dict[str, Any]], before: dict[str, float], path: Path, title: str) -> None:
    """Every variant's Pareto frontier in one plot, with the anchors as they were before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab10")
    for k, row in enumerate(rows):
        front = sorted((r for r in row["results"] if r.pareto), key=lambda r: r.flops)
        ax.plot([r.flops for r in front], [r.acc1 for r in front], marker="o", ms=4, lw=1.5, color=cmap(k % 10),
                label=f"{row['variant']} ({row['frontier']} on frontier, gap {row['gap']:.1%})")
    anchors = [r for r in rows[0]["results"] if r.is_anchor]
    ax.scatter([r.flops for r in anchors], [before[r.name] for r in anchors], marker="*", s=200,
               color="black", zorder=5, label="anchors before training")
    ax.set_xlabel("FLOPs (multiply-accumulates)")
    ax.set_ylabel("top-1 %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, before = run(args)
    out = Path(args.out)
    table_rows = [{"variant": row["variant"], "networks": row["networks"], "frontier": row["frontier"],
                   "gap": f"{row['gap']:.1%}", "best": f"{row['best']:.2f}", "vs_v1": _signed(row.get("vs_v1")),
                   "vs_zoo": _signed(row.get("vs_zoo")),
                   "vs_v1_regions": " / ".join(_signed(v) for v in row.get("vs_v1_by_region") or []) or "-", "vs_zoo_worst": _signed(row.get("vs_zoo_worst")),
                   **{f"d_{n}": f"{row['drift'][n]:+.2f}" for n in before}} for row in rows]
    columns = [("variant", "variant"), ("networks", "networks"), ("frontier", "on frontier"), ("gap", "widest gap"),
               ("best", "best top-1 %"), ("vs_v1", "vs v1 (mean)"), ("vs_v1_regions", "vs v1 by anchor pair"), ("vs_zoo", "vs zoo (mean)"),
               ("vs_zoo_worst", "vs zoo (worst)")] + [(f"d_{n}", f"{n} drift") for n in before]
    text = table(table_rows, columns)
    settings = (f"family {args.family}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
                f"evaluated on {args.split} ({rows[0]['results'][0].images} images), lora rank {args.lora_rank} "
                f"alpha {args.lora_alpha}, ROS gap {args.ros_gap}")
    print("\n" + text + "\n\n" + settings)
    (out / "summary.md").write_text(f"{settings}\n\n```\n{text}\n```\n")
    (out / "summary.json").write_text(json.dumps({"settings": vars(args), "anchors_before": before, "variants": [
        {k: v for k, v in row.items() if k != "results"} for row in rows]}, indent=2) + "\n")
    plot(rows, before, out / "frontiers.png", f"Pareto frontiers on {args.split}: {args.family}, {args.steps} steps each")
    print(f"wrote {out / 'frontiers.png'}, {out / 'summary.md'}, {out / 'summary.json'} "
          f"in {time.perf_counter() - t0:.0f}s ({sum(len(r['results']) for r in rows)} networks evaluated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
