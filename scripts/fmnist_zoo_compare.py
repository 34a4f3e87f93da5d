#!/usr/bin/env python
"""Compare a Fashion-MNIST SN-Net (one ``snnet demo`` run) with the zoo of individually trained
networks, at matched FLOPs over the range its anchors span, and what each side cost to train.

    python scripts/fmnist_zoo_compare.py runs/demo-val-16-32-96          # a demo's --out folder
    python scripts/fmnist_zoo_compare.py runs/demo-val-16-32-96 --zoo snnet/weights/fmnist_zoo.json
    python scripts/fmnist_zoo_compare.py RUN --zoo docs/zoo/fmnist_zoo_converged.json --verdict snnet/weights/fmnist_converged.json
    python scripts/fmnist_zoo_compare.py RUN1 RUN2 ... --zoo Z --curve docs/zoo/joint-steps.png   # runs differing in joint steps

With several runs (one setting, different numbers of joint steps) it prints one line each and,
with ``--curve``, plots the trade-off: the gap to the zoo (mean and worst) against the joint
training's image-steps, beside the image-steps of the zoo members in the range.

The accuracies compared are on the split the demo measured (``summary.json``'s ``eval_split``:
``val`` for research runs) and the zoo's column of the same split. Frontiers are compared with
:func:`snnet.results.compare_fronts` (exact step functions, mean over log FLOPs).

Training cost is given three ways: wall seconds (as measured, on a shared machine: indicative),
image-steps (images seen, = steps x batch), and an estimate of training compute in MACs: a
forward and a backward pass cost about 3x the forward's MACs, so a zoo member costs
``3 x flops x image_steps``; the joint training costs ``image_steps x (3 x the mean FLOPs of the
stitches it samples uniformly + the forward of the distillation teacher)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import snnet
from snnet.demo import widest_gap
from snnet.io import atomic_write
from snnet.pretrained import FmnistVitSpec
from snnet.report import human, table
from snnet.results import compare_fronts, front_rows, load_results, network_rows, pareto_front
from snnet.zoo import load_zoo

WEIGHTS = Path(snnet.__file__).parent / "weights"


def demo_settings(summary: dict[str, Any]) -> tuple[int, int, bool]:
    """(steps, batch size, distilled) of the demo run a summary.json describes: written with the
    configuration tree (config.train) or before it (a flat DemoConfig)."""
    cfg = summary["config"]
    if "train" in cfg:
        t = cfg["train"]
        return t["schedule"]["max_steps"], t["data"]["batch_size"], t["distill"]["teacher"] is not None
    return cfg["steps"], cfg["batch_size"], bool(cfg["distill"])


def zoo_rows(zoo: Path, split: str) -> list[dict[str, Any]]:
    """The zoo's models as rows with the accuracy of ``split`` as ``acc1`` (and the table's other
    columns: ``images``, ``seconds``, ``image_steps``...), cheapest first."""
    return sorted((r.to_dict() for r in load_zoo(zoo, split)), key=lambda r: r["flops"])


def zoo_name(label: str) -> str:
    """The zoo name of an anchor label (``fmnist_vit_s`` -> ``fmnist_vit_w32_d6_p7``)."""
    return FmnistVitSpec.parse(label).name


def cost_table(demo: Path, summary: dict[str, Any], results: list, zoo: list[dict[str, Any]],
               lo: float, hi: float) -> str:
    steps, batch, distilled = demo_settings(summary)
    by_name = {z["name"]: z for z in zoo}
    anchors = [by_name[zoo_name(r.name)] for r in results if r.is_anchor]
    joint_images = steps * batch
    mean_flops = statistics.mean(r.flops for r in results)
    teacher = max(r.flops for r in results if r.is_anchor) if distilled else 0
    in_range = [z for z in zoo if lo <= z["flops"] <= hi]

    def side(what: str, models: list[dict[str, Any]], extra_s: float = 0, extra_img: int = 0,
             extra_macs: float = 0) -> dict[str, Any]:
        return {"what": what, "n": len(models) if not extra_img else f"{len(models)} + joint",
                "s": f"{sum(m['seconds'] for m in models) + extra_s:.0f}",
                "img": human(sum(m["image_steps"] for m in models) + extra_img),
                "macs": human(sum(3 * m["flops"] * m["image_steps"] for m in models) + extra_macs)}

    rows = [side("SN-Net: its anchors' training", anchors),
            {"what": f"SN-Net: joint training ({steps} steps x {batch})", "n": "-",
             "s": f"{summary['seconds']['train']:.0f}", "img": human(joint_images),
             "macs": human(joint_images * (3 * mean_flops + teacher))},
            side("SN-Net: total", anchors, summary["seconds"]["train"], joint_images,
                 joint_images * (3 * mean_flops + teacher)),
            side(f"zoo: every member in {human(lo)}-{human(hi)} FLOPs", in_range),
            side("zoo: the members on its frontier there", [z for z in in_range if z["name"] in _front_names(in_range)])]
    return table(rows, [("what", "training"), ("n", "models"), ("s", "wall s"), ("img", "image-steps"),
                        ("macs", "compute (MACs, est.)")])


def joint_training(demo: Path, summary: dict[str, Any], results: list) -> str:
    """What the joint training gave each stitch (steps drawn, from metrics.jsonl) and did to the anchors."""
    steps = Counter(json.loads(line)["stitch"] for line in (demo / "train" / "metrics.jsonl").open() if line.strip())
    counts = [steps.get(r.id, 0) for r in results]
    per = demo_settings(summary)[1]
    drift = ", ".join(f"{k} {v:.2f} -> {summary['anchors_after'][k]:.2f} ({summary['anchors_after'][k] - v:+.2f})"
                      for k, v in summary["anchors_before"].items())
    return (f"Joint training: {sum(counts)} steps over {len(results)} networks: {min(counts)}-{max(counts)} steps "
            f"(median {statistics.median(counts):.0f}, {statistics.median(counts) * per:,.0f} images) per network\n"
            f"Anchors before -> after joint training: {drift}")


def _front_names(rows: list[dict[str, Any]]) -> set[str]:
    return {r["name"] for r in front_rows(rows)}


def zoo_in_range(zoo: list[dict[str, Any]], lo: float, hi: float) -> dict[str, int]:
    """How many zoo members cost ``lo``-``hi`` FLOPs and the image-steps they were trained for (what
    the SN-Net's joint training is set against)."""
    in_range = [z for z in zoo if lo <= z["flops"] <= hi]
    return {"zoo_in_range": len(in_range), "zoo_in_range_image_steps": sum(z["image_steps"] for z in in_range)}


def load_run(demo: Path, zoo_file: Path, lo: float | None, hi: float | None) -> tuple[list, dict[str, Any], str, list[dict[str, Any]], float, float]:
    """A demo run's networks, its summary, the split it measured, the zoo on that split, and the FLOPs
    range compared (the anchors' unless ``lo``/``hi`` are given)."""
    results = network_rows(load_results(demo / "results.json"))  # the demo writes the zoo's rows too
    summary = json.loads((demo / "summary.json").read_text())
    split = summary.get("eval_split", "test")
    anchors = [r.flops for r in results if r.is_anchor]
    return results, summary, split, zoo_rows(zoo_file, split), lo or min(anchors), hi or max(anchors)


def trade_off(args: argparse.Namespace) -> None:
    """Runs of one setting at different joint steps: each one's gap to the zoo, and the curve."""
    rows = []
    for demo in args.demo:
        results, summary, split, zoo, lo, hi = load_run(demo, args.zoo, args.lo, args.hi)
        steps, batch, _ = demo_settings(summary)
        c = compare_fronts(results, zoo, lo=lo, hi=hi)
        rows.append({"run": str(demo), "split": split, "steps": steps, "image_steps": steps * batch, "mean": round(c.mean, 4),
                     "worst": round(c.worst.diff, 4), "worst_at": c.worst.start, "ahead": round(c.ahead, 4),
                     **zoo_in_range(zoo, lo, hi)})
    rows.sort(key=lambda r: r["image_steps"])
    print(table([{**r, "img": human(r["image_steps"]), "m": f"{r['mean']:+.2f}", "w": f"{r['worst']:+.2f} at {human(r['worst_at'])}",
                  "a": f"{r['ahead']:.0%}", "z": f"{r['zoo_in_range']} / {human(r['zoo_in_range_image_steps'])}"} for r in rows],
                [("run", "run"), ("steps", "joint steps"), ("img", "image-steps"), ("m", "mean vs zoo"), ("w", "worst"),
                 ("a", "ahead on"), ("z", "zoo in range / image-steps")]))
    if args.curve is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [max(r["image_steps"], 1) for r in rows]
    ax.plot(xs, [r["mean"] for r in rows], "o-", label="mean gap at matched FLOPs")
    ax.plot(xs, [r["worst"] for r in rows], "s--", label="worst gap")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-0.3, color="tab:blue", lw=0.8, ls=":", label="goal for the mean (-0.3)")
    ax.axhline(-1.0, color="tab:orange", lw=0.8, ls=":", label="goal for the worst (-1.0)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{r['steps']:,}" for r in rows], fontsize=8)
    ax.minorticks_off()
    batch = rows[-1]["image_steps"] // max(rows[-1]["steps"], 1)
    ax.set_xlabel(f"joint steps, batch {batch} (the {rows[-1]['zoo_in_range']} zoo members in the range: "
                  f"{human(rows[-1]['zoo_in_range_image_steps'])} image-steps)", fontsize=9)
    ax.set_ylabel(f"SN-Net - zoo, {rows[-1]['split']} top-1 points", fontsize=9)
    ax.set_title("SN-Net against the zoo at matched FLOPs, by joint training", fontsize=10)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.curve, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    data = args.curve.with_suffix(".json")
    atomic_write(data, lambda tmp: tmp.write_text(json.dumps({"zoo": str(args.zoo), "runs": rows}, indent=1) + "\n"))
    print(f"wrote {args.curve} and {data}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", type=Path, nargs="+", help="a folder written by `snnet demo --out` (results.json, summary.json); several for --curve")
    p.add_argument("--zoo", type=Path, default=WEIGHTS / "fmnist_zoo.json")
    p.add_argument("--lo", type=float, default=None, help="compare from this many FLOPs (default: the cheapest anchor)")
    p.add_argument("--hi", type=float, default=None, help="compare up to this many FLOPs (default: the dearest anchor)")
    p.add_argument("--verdict", type=Path, default=None,
                   help="also write the comparison as the JSON `snnet demo` prints its converged line from "
                        "(snnet/weights/fmnist_converged.json ships the best run's)")
    p.add_argument("--curve", type=Path, default=None,
                   help="with several runs: plot their gap to the zoo against joint image-steps into this PNG (and .json)")
    args = p.parse_args()
    if len(args.demo) > 1 or args.curve is not None:
        return trade_off(args)
    args.demo = args.demo[0]

    results, summary, split, zoo, lo, hi = load_run(args.demo, args.zoo, args.lo, args.hi)

    front = _front_names(zoo)
    print(f"The zoo on {split} ({args.zoo.name}; * = on its frontier):")
    print(table([{"name": z["name"], "params": human(z["params"]), "flops": human(z["flops"]), "acc1": f"{z['acc1']:.2f}",
                  "f": "*" if z["name"] in front else ""} for z in zoo],
                [("name", "model"), ("params", "params"), ("flops", "FLOPs"), ("acc1", f"{split} top-1 %"), ("f", "")]))

    zoo_gap = widest_gap([z["flops"] for z in front_rows(zoo)], lo, hi)
    print(f"The zoo's own frontier over the anchors' range {human(lo)}-{human(hi)}: widest FLOPs gap {zoo_gap:.1%} "
          "of the range (the demo asks <= 20% of its networks)")

    n_front = len(pareto_front(results))
    print(f"\nThe SN-Net ({args.demo}): {len(results)} networks, {n_front} on its frontier; anchors "
          + ", ".join(f"{r.name} {r.acc1:.2f}%" for r in results if r.is_anchor))
    c = compare_fronts(results, zoo, lo=lo, hi=hi)
    print("\n" + c.describe("SN-Net stitches", "zoo"))
    # How much of the difference is the anchors' design: the zoo's members of the anchors' depth
    # against the whole zoo, and the stitches against those members alone.
    depths = {FmnistVitSpec.parse(r.name).depth for r in results if r.is_anchor}
    same = [z for z in zoo if FmnistVitSpec.parse(z["name"]).depth in depths]
    if len(depths) == 1 and same and len(same) < len(zoo) and min(z["flops"] for z in same) <= hi:
        d = depths.pop()
        design = compare_fronts(same, zoo, lo=lo, hi=hi)
        print(f"\nThe anchors' design: the zoo's {len(same)} depth-{d} members against the whole zoo over "
              f"{human(design.lo)}-{human(design.hi)}: mean {design.mean:+.2f} points, worst {design.worst.diff:+.2f}")
        alone = compare_fronts(results, same, lo=lo, hi=hi)
        print(f"The SN-Net stitches against the depth-{d} members alone over {human(alone.lo)}-{human(alone.hi)}: "
              f"mean {alone.mean:+.2f} points, worst {alone.worst.diff:+.2f}, ahead on {alone.ahead:.0%}")
    ordered = sorted((r for r in results if r.is_anchor), key=lambda r: r.flops)
    regions = []
    for a, b in zip(ordered, ordered[1:]):
        part = compare_fronts(results, zoo, lo=a.flops, hi=b.flops)
        regions.append({"region": f"{a.name} -> {b.name}", "range": f"{human(a.flops)}-{human(b.flops)}",
                        "mean": f"{part.mean:+.2f}", "worst": f"{part.worst.diff:+.2f} at {human(part.worst.start)}",
                        "ahead": f"{part.ahead:.0%}"})
    print("\nBetween each pair of neighbouring anchors:")
    print(table(regions, [("region", "anchors"), ("range", "FLOPs"), ("mean", "mean diff"), ("worst", "worst"),
                          ("ahead", "SN-Net ahead on")]))
    print("\nPiece by piece (the best network of each side costing at most the piece's start):")
    print(table([{"range": f"{human(s.start)}-{human(s.end)}" if s.end > s.start else human(s.start),
                  "ours": s.ours, "oy": f"{s.ours_y:.2f}", "theirs": s.theirs, "ty": f"{s.theirs_y:.2f}",
                  "d": f"{s.diff:+.2f}"} for s in c.steps],
                [("range", "FLOPs"), ("ours", "SN-Net best"), ("oy", "top-1"), ("theirs", "zoo best"),
                 ("ty", "top-1"), ("d", "diff")]))
    print("\n" + joint_training(args.demo, summary, results))
    print("\nTraining cost:")
    print(cost_table(args.demo, summary, results, zoo, lo, hi))
    if args.verdict is not None:
        write_verdict(args.verdict, args.demo, args.zoo, summary, c, zoo, lo, hi, len(results), n_front)
        print(f"\nwrote {args.verdict}")


def write_verdict(path: Path, demo: Path, zoo_file: Path, summary: dict[str, Any], c: Any,
                  zoo: list[dict[str, Any]], lo: float, hi: float, networks: int, on_front: int) -> None:
    """The comparison in the form ``snnet demo`` reads (:func:`snnet.demo.converged_verdict`)."""
    steps, batch, distilled = demo_settings(summary)
    optim = summary["config"]["train"]["optim"]
    worst = c.worst
    data = {"split": summary.get("eval_split", "test"), "zoo": zoo_file.name, "zoo_models": len(zoo), **zoo_in_range(zoo, lo, hi),
            "flops_range": [lo, hi], "mean_diff": round(c.mean, 4), "ahead": round(c.ahead, 4), "se": c.se,
            "worst": {"diff": round(worst.diff, 4), "from_flops": worst.start, "to_flops": worst.end,
                      "stitch": worst.ours, "stitch_acc1": worst.ours_y, "zoo": worst.theirs, "zoo_acc1": worst.theirs_y},
            "setting": {"steps": steps, "batch_size": batch, "distilled": distilled, "lr": optim["lr"],
                        "anchor_lr_scale": optim["anchor_lr_scale"]},
            "joint_image_steps": steps * batch, "networks": networks, "on_frontier": on_front, "run": str(demo),
            "command": f"python scripts/fmnist_zoo_compare.py {demo} --zoo {zoo_file} --verdict {path}"}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


if __name__ == "__main__":
    main()
