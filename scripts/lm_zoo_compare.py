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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snnet.errors import ResultsError, SnnetError
from snnet.io import atomic_write
from snnet.plot import plot_pareto
from snnet.report import human
from snnet.results import StitchResult, compare_fronts, frontier, load_results, network_rows

FAMILY_ROWS = "the anchors, trained alone"  # zoo rows of the stitched network's own anchors
NEW_ROWS = "other sizes, trained alone"


@dataclass(frozen=True)
class Member:
    """One zoo member: its row (kind "zoo", measured on the stitches' held-out text) and what training it took."""

    row: StitchResult
    tokens: float | None  # tokens trained on (None: not known)
    seconds: float | None  # wall seconds of that training (None: not recorded)


def _zoo_row(name: str, flops: int, params: int, m: dict[str, Any], family: str) -> StitchResult:
    return StitchResult(None, name, int(flops), int(params), m["acc1"], math.nan, m["loss"], int(m["tokens"]), False,
                        kind="zoo", ppl=m["ppl"], bpb=m["bpb"],
                        extra={"source": "trained alone", "family": family, "tokens": m["tokens"], "bytes": m["bytes"]})


def load_members(path: Path, anchors: set[str], pretrain_tokens: float | None) -> list[Member]:
    """The zoo, cheapest first, from either file: ``zoo.json`` of ``train_lm_family.py --zoo`` (its members on the
    demo's blocks, with their training), or the ``results.json`` of ``snnet eval`` on a network built from the zoo
    members (its anchor rows are the members alone; they trained on ``pretrain_tokens`` tokens each, if given)."""
    data = json.loads(path.read_text())
    family = lambda name: FAMILY_ROWS if name in anchors else NEW_ROWS  # noqa: E731
    if isinstance(data, dict) and "models" in data:
        members = [Member(_zoo_row(n, m["flops"], m["params"], m["held_out_demo"], family(n)), m["tokens_trained"],
                          m["seconds"]) for n, m in data["models"].items()]
    elif isinstance(data, list):
        members = [Member(_zoo_row(r.name, r.flops, r.params, r.to_dict(), family(r.name)), pretrain_tokens, None)
                   for r in load_results(path) if r.is_anchor]
    else:
        raise ResultsError(f"{path} is neither a zoo.json (train_lm_family.py --zoo) nor a results.json (snnet eval)")
    if not members:
        raise ResultsError(f"{path} holds no zoo member")
    return sorted(members, key=lambda m: m.row.flops)


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
    for z in (z for z in zoo if z.flops >= front[0].flops):  # a member cheaper than every stitch has none to face
        lo, hi, interp = interpolate(front, z.flops)
        near = " .. ".join(f"{r.name} ({human(r.flops)}, {r.value('bpb'):.4f})" for r in (lo, hi) if r is not None)
        rows.append({"name": f"`{z.name}`", "flops": human(z.flops), "bpb": f"{z.value('bpb'):.4f}", "near": near,
                     "interp": f"{interp:.4f}", "diff": f"{interp - z.value('bpb'):+.4f}",
                     "step": f"{lo.value('bpb') - z.value('bpb'):+.4f}"})
    return md_table(rows, [("name", "zoo member"), ("flops", "FLOPs/token"), ("bpb", "zoo bits/byte"),
                           ("near", "stitched frontier around it (FLOPs, bits/byte)"),
                           ("interp", "frontier at its FLOPs"), ("diff", "stitches - zoo"),
                           ("step", "best stitch costing <= it - zoo")])


def joint_training(summary: dict[str, Any] | None, joint_tokens: float | None, network: list[StitchResult]
                   ) -> tuple[str, float | None, float | None, float | None]:
    """What the joint training was (its description, tokens, estimated MACs, wall seconds): from the demo's
    summary.json, else ``joint_tokens`` with the largest anchor as the distillation teacher."""
    largest = max(r.flops for r in network if r.is_anchor)
    mean = statistics.mean(r.flops for r in network)
    if summary is not None:
        train = summary["config"]["train"]
        steps, batch, block = train["schedule"]["max_steps"], train["data"]["batch_size"], train["data"]["block_size"]
        tokens = steps * batch * block
        teacher = largest if train["distill"]["teacher"] is not None else 0
        return (f"{steps} steps x {batch} blocks x {block} tokens", tokens, tokens * (3 * mean + teacher),
                summary["seconds"]["train"])
    if joint_tokens is None:
        return "not known (no summary.json; give --joint-tokens)", None, None, None
    return "as given, the largest anchor as teacher", joint_tokens, joint_tokens * (3 * mean + largest), None


def cost_rows(members: list[Member], network: list[StitchResult], joint: tuple[str, Any, Any, Any],
              pretrain_tokens: float | None) -> list[dict[str, Any]]:
    """Tokens, estimated MACs and wall seconds of each side's training (a dash where a figure is not known)."""
    by_name = {m.row.name: m for m in members}
    anchors = [by_name.get(r.name) or Member(r, pretrain_tokens, None) for r in network if r.is_anchor]
    others = [m for m in members if m.row.value("family") != FAMILY_ROWS]
    lo, hi = min(r.flops for r in network if r.is_anchor), max(r.flops for r in network if r.is_anchor)
    within = [m for m in others if lo <= m.row.flops <= hi]  # the ones the stitches stand in for
    what, tokens, macs, seconds = joint

    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]

    def side(label: str, ms: list[Member], n: str, extra: tuple[Any, Any, Any] = (0, 0, 0)) -> dict[str, Any]:
        t = total([m.tokens for m in ms] + [extra[0]])
        c = total([None if m.tokens is None else 3 * m.row.flops * m.tokens for m in ms] + [extra[1]])
        s = total([m.seconds for m in ms] + [extra[2]])
        return {"what": label, "n": n, "tokens": "-" if t is None else human(t), "macs": "-" if c is None else human(c),
                "s": "-" if s is None else f"{s:,.0f}"}

    return [side(f"SN-Net: its {len(anchors)} anchors, trained alone", anchors, str(len(anchors))),
            side(f"SN-Net: joint training ({what})", [], "-", (tokens, macs, seconds)),
            side("SN-Net: total", anchors, f"{len(network)} networks", (tokens, macs, seconds)),
            side(f"zoo: the other sizes within the anchors' {human(lo)}-{human(hi)} FLOPs", within, str(len(within))),
            side("zoo: every member in that range (the anchors alone too)", anchors + within,
                 str(len(anchors + within))),
            side("zoo: every member", members, str(len(members)))]


def _region(label: str, c: Any) -> dict[str, Any]:
    def at(step: Any) -> str:
        return f"{step.diff:+.4f} at {human(step.start)} ({step.ours} vs {step.theirs})"
    return {"region": label, "range": f"{human(c.lo)}-{human(c.hi)}", "mean": f"{c.mean:+.4f}",
            "ahead": f"{c.ahead:.0%}", "worst": at(c.worst), "best": at(c.best)}


def report(stitched: Path, zoo_path: Path, out: Path, pretrain_tokens: float | None = None,
           joint_tokens: float | None = None) -> str:
    """Compare, write ``zoo_compare.md``, ``zoo.html`` and ``zoo.png`` into ``out``; return the text."""
    results = load_results(stitched / "results.json")
    network = network_rows(results)
    summary_path = stitched / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    anchors = sorted((r for r in network if r.is_anchor), key=lambda r: r.flops)
    members = load_members(zoo_path, {r.name for r in anchors}, pretrain_tokens)
    zoo = [m.row for m in members]
    seen = {(r.value("tokens"), r.value("bytes")) for r in [*network, *zoo]}
    if len(seen) != 1:
        raise ResultsError(f"the stitches and the zoo were measured on different held-out text (tokens, bytes: "
                           f"{sorted(seen)}): measure both on the same blocks (for the demo: --family.demo_blocks equal "
                           "to its --demo.eval_blocks)")
    tokens, nbytes = seen.pop()
    front = frontier(network, y="bpb")
    cheapest = min(r.flops for r in zoo)  # below it the zoo has nothing to compare with
    spans = [(f"`{a.name}` .. `{b.name}`", a.flops, b.flops) for a, b in zip(anchors, anchors[1:])]
    regions = [_region(label, compare_fronts(network, zoo, y="bpb", lo=lo, hi=hi))
               for label, lo, hi in [*spans, ("all", anchors[0].flops, anchors[-1].flops)] if cheapest <= hi]
    zoo_front = {r.name for r in frontier(zoo, y="bpb")}
    zoo_table = md_table([{"name": f"`{r.name}`", "params": f"{r.params:,}", "flops": human(r.flops),
                           "bpb": f"{r.value('bpb'):.4f}", "ppl": f"{r.value('ppl'):.2f}", "acc1": f"{r.acc1:.1f}",
                           "what": r.value("family"), "f": "*" if r.name in zoo_front else ""} for r in zoo],
                         [("name", "member"), ("params", "params"), ("flops", "FLOPs/token"), ("bpb", "bits/byte"),
                          ("ppl", "ppl"), ("acc1", "top-1 %"), ("what", "which"), ("f", "zoo frontier")])
    cost = md_table(cost_rows(members, network, joint_training(summary, joint_tokens, network), pretrain_tokens),
                    [("what", "training"), ("n", "models"), ("tokens", "tokens"), ("macs", "compute (MACs, est.)"),
                     ("s", "wall s")])
    paths = plot_pareto([*results, *zoo], out / "zoo.html", out / "zoo.png", y="bpb",
                        title=f"{len(network)} stitched networks vs {len(zoo)} LMs trained alone: "
                              "bits per byte vs FLOPs per token")
    text = f"""Held out: {tokens:,} tokens ({nbytes:,} bytes), the same blocks on both sides. Bits per byte; lower is better.
Differences are stitches minus zoo, in bits per byte: negative means the stitches do better.

The zoo (`{zoo_path}`; * = on the zoo's own frontier):

{zoo_table}

Each zoo member against the stitched frontier ({len(front)} of {len(network)} networks, `{stitched / 'results.json'}`):

{member_table(front, zoo)}

Frontier against frontier (exact step functions; mean over log FLOPs; ahead: share of the log-FLOPs range where the stitches do better):

{md_table(regions, [("region", "between"), ("range", "FLOPs/token"), ("mean", "mean"), ("ahead", "stitches ahead"),
                    ("worst", "worst for the stitches"), ("best", "best for the stitches")])}

Training cost (compute: 3 x forward MACs per token x tokens; the joint training samples one of its
{len(network)} networks per step and runs the largest anchor as its teacher; wall seconds as recorded):

{cost}
"""
    atomic_write(out / "zoo_compare.md", lambda p: p.write_text(text))
    return text + "\nwrote " + ", ".join(str(p) for p in [out / "zoo_compare.md", *paths])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("stitched", type=Path, help="a folder with the stitches' results.json: `snnet demo --lm`'s "
                   "(its summary.json gives the joint training) or `snnet eval`'s")
    p.add_argument("--zoo", type=Path, default=Path("runs/lm_zoo/zoo.json"),
                   help="zoo.json of `scripts/train_lm_family.py --zoo`, or the results.json of `snnet eval` on a "
                        "network built from the zoo members (its anchors are the zoo)")
    p.add_argument("--out", type=Path, default=None, help="where the tables and plots go (default: the stitches' folder)")
    p.add_argument("--pretrain-tokens", type=float, default=None,
                   help="tokens each anchor and zoo member was trained on, where the files do not say (Pythia: 3e11)")
    p.add_argument("--joint-tokens", type=float, default=None,
                   help="tokens of the joint training (steps x batch x block), without a demo's summary.json")
    args = p.parse_args(argv)
    try:
        for path in (args.stitched / "results.json", args.zoo):
            if not path.is_file():
                raise SnnetError(f"{path} does not exist: evaluate the stitches (`snnet demo --lm`, `snnet eval`) and "
                                 "the zoo (`scripts/train_lm_family.py --zoo`) first")
        print(report(args.stitched, args.zoo, args.out or args.stitched, args.pretrain_tokens, args.joint_tokens))
    except SnnetError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
