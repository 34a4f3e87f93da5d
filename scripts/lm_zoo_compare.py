#!/usr/bin/env python
"""Compare the stitched language models of one ``snnet demo --lm`` run with the LM zoo (same-design
members trained alone, ``scripts/train_lm_family.py --zoo``) at matched FLOPs per token, and what
each side cost to train. Reads both results files; writes the plot and the tables.

    python scripts/lm_zoo_compare.py docs/lm-demo --zoo docs/lm-demo/zoo.json --out docs/lm-demo

Both sides are measured on the same held-out text: the demo's blocks (its ``results.json`` says how
many tokens and bytes) are the first ``family.demo_blocks`` blocks the zoo script measures every
member on; a zoo file measured on other text is refused. The zoo includes the shipped members
(``stdlib-lm-xs/s/m``) as they were trained alone, before the demo's joint training.

Writes into ``--out``: ``zoo_compare.md`` (the tables below, as Markdown), ``zoo.html``
(interactive plotly: stitches, anchors, their frontier, the zoo and its frontier) and ``zoo.png``.

- **Per zoo member**: the stitched frontier at the member's FLOPs, interpolated linearly in log
  FLOPs between the two frontier networks around it (and the best network costing at most as
  much: the step function :func:`snnet.results.compare_fronts` uses), minus the member's bits per
  byte: negative means the stitches do better.
- **Frontier against frontier** over the anchors' range, and between each pair of anchors
  (:func:`snnet.results.compare_fronts`: exact step functions, mean over log FLOPs).
- **Training cost**: tokens trained on, and compute estimated as 3 x forward MACs per token (a
  forward and a backward pass) x tokens; the joint training costs ``tokens x (3 x the mean FLOPs of
  the networks it samples uniformly + the distillation teacher's forward)``. Wall seconds are as
  recorded, on a shared machine: indicative only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from snnet.errors import ResultsError, SnnetError
from snnet.io import atomic_write
from snnet.plot import plot_pareto
from snnet.report import human
from snnet.results import StitchResult, compare_fronts, frontier, load_results, network_rows

FAMILY_ROWS = "the anchors, trained alone"  # the shipped members' rows in the zoo file
NEW_ROWS = "other widths, trained alone"


def zoo_results(zoo: dict[str, Any]) -> list[StitchResult]:
    """The zoo file's members as zoo rows of a results file, measured on the demo's held-out blocks."""
    rows = []
    for name, m in zoo["models"].items():
        h = m["held_out_demo"]
        rows.append(StitchResult(None, name, int(m["flops"]), int(m["params"]), h["acc1"], math.nan, h["loss"],
                                 h["tokens"], False, kind="zoo", extra={
                                     "source": "stdlib-lm zoo", "bpb": h["bpb"], "ppl": h["ppl"], "tokens": h["tokens"],
                                     "bytes": h["bytes"], "width": m["arch"]["hidden"],
                                     "family": FAMILY_ROWS if m.get("source") == "family" else NEW_ROWS}))
    return sorted(rows, key=lambda r: r.flops)


def interpolate(front: list[StitchResult], flops: float) -> tuple[StitchResult, StitchResult | None, float]:
    """The frontier network costing at most ``flops``, the next one, and the frontier's bits per byte
    at ``flops`` linearly interpolated in log FLOPs between them (that network's own at or past the end)."""
    below = [r for r in front if r.flops <= flops]
    if not below:
        raise ResultsError(f"no stitched network costs {human(flops)} FLOPs or less")
    lo = below[-1]
    above = [r for r in front if r.flops > flops]
    if not above or lo.flops == flops:
        return lo, None, lo.value("bpb")
    hi = above[0]
    t = math.log(flops / lo.flops) / math.log(hi.flops / lo.flops)
    return lo, hi, lo.value("bpb") + t * (hi.value("bpb") - lo.value("bpb"))


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(str(r[k]) for k, _ in columns) + " |" for r in rows])


def member_table(front: list[StitchResult], zoo: list[StitchResult]) -> str:
    rows = []
    for z in zoo:
        lo, hi, interp = interpolate(front, z.flops)
        near = " .. ".join(f"{r.name} ({human(r.flops)}, {r.value('bpb'):.4f})" for r in (lo, hi) if r is not None)
        rows.append({"name": f"`{z.name}`", "flops": human(z.flops), "bpb": f"{z.value('bpb'):.4f}", "near": near,
                     "interp": f"{interp:.4f}", "diff": f"{interp - z.value('bpb'):+.4f}",
                     "step": f"{lo.value('bpb') - z.value('bpb'):+.4f}"})
    return md_table(rows, [("name", "zoo member"), ("flops", "FLOPs/token"), ("bpb", "zoo bits/byte"),
                           ("near", "stitched frontier around it (FLOPs, bits/byte)"),
                           ("interp", "frontier at its FLOPs"), ("diff", "stitches - zoo"),
                           ("step", "best stitch costing <= it - zoo")])


def cost_rows(zoo_file: dict[str, Any], network: list[StitchResult], summary: dict[str, Any]) -> list[dict[str, Any]]:
    train = summary["config"]["train"]
    steps, batch, block = train["schedule"]["max_steps"], train["data"]["batch_size"], train["data"]["block_size"]
    tokens = steps * batch * block
    teacher = max(r.flops for r in network if r.is_anchor) if train["distill"]["teacher"] is not None else 0
    joint_macs = tokens * (3 * statistics.mean(r.flops for r in network) + teacher)
    models = zoo_file["models"]
    anchors = [m for m in models.values() if m.get("source") == "family"]
    new = [m for m in models.values() if m.get("source") != "family"]

    def side(what: str, ms: list[dict[str, Any]], n: str, s: float = 0, t: int = 0, macs: float = 0) -> dict[str, Any]:
        return {"what": what, "n": n, "s": f"{sum(m['seconds'] for m in ms) + s:,.0f}",
                "tokens": human(sum(m["tokens_trained"] for m in ms) + t),
                "macs": human(sum(3 * m["flops"] * m["tokens_trained"] for m in ms) + macs)}

    return [side("SN-Net: its three anchors, trained alone", anchors, "3"),
            side(f"SN-Net: joint training ({steps} steps x {batch} blocks x {block} tokens)", [], "-",
                 summary["seconds"]["train"], tokens, joint_macs),
            side("SN-Net: total", anchors, f"{len(network)} networks", summary["seconds"]["train"], tokens, joint_macs),
            side("zoo: the other widths", new, str(len(new))),
            side("zoo: every member (the anchors alone and the other widths)", anchors + new, str(len(anchors + new)))]


def report(demo: Path, zoo_path: Path, out: Path) -> str:
    results = load_results(demo / "results.json")
    network = network_rows(results)
    summary = json.loads((demo / "summary.json").read_text())
    zoo_file = json.loads(zoo_path.read_text())
    zoo = zoo_results(zoo_file)
    seen = {(r.value("tokens"), r.value("bytes")) for r in network} | {(r.value("tokens"), r.value("bytes")) for r in zoo}
    if len(seen) != 1:
        raise ResultsError(f"the demo and the zoo were measured on different held-out text (tokens, bytes: "
                           f"{sorted(seen)}): train the zoo with --family.demo_blocks equal to the demo's --demo.eval_blocks")
    tokens, nbytes = seen.pop()
    front = frontier(network, y="bpb")
    anchors = sorted((r for r in network if r.is_anchor), key=lambda r: r.flops)
    whole = compare_fronts(network, zoo, y="bpb", lo=anchors[0].flops, hi=anchors[-1].flops)
    regions = []
    for a, b in zip(anchors, anchors[1:]):
        part = compare_fronts(network, zoo, y="bpb", lo=a.flops, hi=b.flops)
        regions.append({"region": f"`{a.name}` .. `{b.name}`", "range": f"{human(a.flops)}-{human(b.flops)}",
                        "mean": f"{part.mean:+.4f}", "ahead": f"{part.ahead:.0%}",
                        "worst": f"{part.worst.diff:+.4f} at {human(part.worst.start)} ({part.worst.ours} vs {part.worst.theirs})",
                        "best": f"{part.best.diff:+.4f} at {human(part.best.start)} ({part.best.ours} vs {part.best.theirs})"})
    regions.append({"region": "all", "range": f"{human(whole.lo)}-{human(whole.hi)}", "mean": f"{whole.mean:+.4f}",
                    "ahead": f"{whole.ahead:.0%}",
                    "worst": f"{whole.worst.diff:+.4f} at {human(whole.worst.start)} ({whole.worst.ours} vs {whole.worst.theirs})",
                    "best": f"{whole.best.diff:+.4f} at {human(whole.best.start)} ({whole.best.ours} vs {whole.best.theirs})"})
    zoo_front = {r.name for r in frontier(zoo, y="bpb")}
    zoo_table = md_table([{"name": f"`{r.name}`", "width": r.value("width"), "params": f"{r.params:,}",
                           "flops": human(r.flops), "bpb": f"{r.value('bpb'):.4f}", "ppl": f"{r.value('ppl'):.2f}",
                           "acc1": f"{r.acc1:.1f}", "what": r.value("family"), "f": "*" if r.name in zoo_front else ""}
                          for r in zoo],
                         [("name", "member"), ("width", "width"), ("params", "params"), ("flops", "FLOPs/token"),
                          ("bpb", "bits/byte"), ("ppl", "ppl"), ("acc1", "top-1 %"), ("what", "which"),
                          ("f", "zoo frontier")])
    cost = md_table(cost_rows(zoo_file, network, summary),
                    [("what", "training"), ("n", "models"), ("tokens", "tokens"), ("macs", "compute (MACs, est.)"),
                     ("s", "wall s (shared machine)")])
    paths = plot_pareto([*results, *zoo], out / "zoo.html", out / "zoo.png", y="bpb",
                        title=f"stdlib-lm: {len(network)} stitched networks vs {len(zoo)} LMs trained alone: "
                              "bits per byte vs FLOPs per token")
    text = f"""Held out: {tokens:,} tokens ({nbytes:,} bytes), the same blocks on both sides. Bits per byte; lower is better.
Differences are stitches minus zoo, in bits per byte: negative means the stitches do better.

The zoo (`{zoo_path}`):

{zoo_table}

Each zoo member against the stitched frontier ({len(front)} of {len(network)} networks, `{demo / 'results.json'}`):

{member_table(front, zoo)}

Frontier against frontier (exact step functions; mean over log FLOPs; ahead: share of the log-FLOPs range where the stitches do better):

{md_table(regions, [("region", "between"), ("range", "FLOPs/token"), ("mean", "mean"), ("ahead", "stitches ahead"),
                    ("worst", "worst for the stitches"), ("best", "best for the stitches")])}

Training cost (compute: 3 x forward MACs per token x tokens; the joint training samples one of its
{len(network)} networks per step and runs the largest anchor as its teacher):

{cost}
"""
    atomic_write(out / "zoo_compare.md", lambda p: p.write_text(text))
    return text + "\nwrote " + ", ".join(str(p) for p in [out / "zoo_compare.md", *paths])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("demo", type=Path, help="a folder `snnet demo --lm` wrote (results.json, summary.json)")
    p.add_argument("--zoo", type=Path, default=Path("runs/lm_zoo/zoo.json"),
                   help="zoo.json of `scripts/train_lm_family.py --zoo`")
    p.add_argument("--out", type=Path, default=None, help="where the tables and plots go (default: the demo folder)")
    args = p.parse_args()
    try:
        for path in (args.demo / "results.json", args.demo / "summary.json", args.zoo):
            if not path.is_file():
                raise SnnetError(f"{path} does not exist: run `snnet demo --lm --run.out_dir DIR` and "
                                 "`scripts/train_lm_family.py --zoo` first")
        print(report(args.demo, args.zoo, args.out or args.demo))
    except SnnetError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
