#!/usr/bin/env python3
"""Build snnet/data_files/reference/*.json: the SN-Net authors' per-network ImageNet results.

Each table of :data:`snnet.reference.PUBLISHED` is read from the authors' repository at the
pinned commit (``git show <commit>:<path>`` in a clone or mirror of ziplab/SN-Net and
ziplab/SN-Netv2), and every row — the reference's ``cfg_id``, its FLOPs (fvcore, at 224 x 224),
parameters where published, top-1 (and top-5 / loss where published) — is written as published,
beside snnet's id and name of the same network (:func:`snnet.reference.reference_ids`) and snnet's
own FLOPs and parameter counts of it (built on the meta device: no weights, no download), so the
two counts can be compared row by row.

    python scripts/build_reference_results.py --sn-net PATH/TO/SN-Net --sn-net-v2 PATH/TO/SN-Netv2
    python scripts/build_reference_results.py --summary   # the figures in the README, from the shipped files
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from snnet.io import atomic_write
from snnet.reference import LAYOUTS, PAPER_EVAL, PUBLISHED, SOURCES, Published, net_reference_ids

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "snnet" / "data_files" / "reference"
IMAGENET_VAL = 50_000
FLOPS = ("fvcore FlopCountAnalysis(...).total() of the network as the reference runs it, on one 3x224x224 image: "
         "one multiply-accumulate counted as one FLOP")


def read_published(repo: Path, table: Published) -> list[dict[str, Any]]:
    """The table's rows (one JSON object per line) at the pinned commit."""
    commit = SOURCES[table.source].commit
    text = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{table.path}"], capture_output=True, text=True,
                          check=True).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build(table: Published, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from snnet.model import create_snnet

    net = create_snnet(list(table.anchors), device="meta", two_way=table.two_way)
    ids = {r: s for s, r in net_reference_ids(net).items()}  # reference id -> snnet id
    costs = net.costs()
    source = SOURCES[table.source]
    out_rows = []
    for row in sorted(rows, key=lambda r: r["cfg_id"]):
        ref = int(row["cfg_id"])
        if ref not in ids:
            raise SystemExit(f"{table.name}: the reference's network {ref} has no counterpart in snnet's space")
        s = net.space[ids[ref]]
        entry: dict[str, Any] = {"ref_id": ref, "id": s.id, "name": s.name, "is_anchor": s.is_anchor,
                                 "flops": int(row["flops"])}
        if "params" in row:
            entry["params"] = int(row["params"])
        entry["acc1"] = float(row["acc1"])
        for key in ("acc5", "loss"):
            if key in row:
                entry[key] = float(row[key])
        entry["snnet_flops"] = costs[s.id].flops
        entry["snnet_params"] = costs[s.id].params
        out_rows.append(entry)
    folder = LAYOUTS[table.layout][1]
    transform = PAPER_EVAL[table.layout]
    return {
        "name": f"reference:{table.name}",
        "description": (f"The SN-Net authors' ImageNet-1k results for every network of their {table.name} SN-Net, "
                        f"as published in {source.repository}/{table.path}, beside snnet's id and name of the same "
                        "network."),
        "source": {"repository": source.repository, "commit": source.commit, "file": table.path,
                   "license": source.license},
        "license": _license(table),
        "anchors": list(table.anchors),
        "space": {"two_way": table.two_way},
        "networks": len(net.space),
        "dataset": "ImageNet-1k validation",
        "images": IMAGENET_VAL,
        "eval_transform": {"resize": round(224 / transform["crop_pct"]), "crop": 224,
                           "interpolation": transform["interpolation"], "mean": list(transform["mean"]),
                           "std": list(transform["std"]), "code": f"{folder} (see snnet.reference.PAPER_EVAL)"},
        "flops": FLOPS,
        "columns": {
            "ref_id": "the reference's cfg_id of the network",
            "id": "snnet's stitch id of the same network (snnet.reference.reference_ids)",
            "name": "snnet's name of the route",
            "flops": "as published (see 'flops')",
            "params": "as published, where the table has them",
            "acc1": "top-1 % as published",
            "acc5": "top-5 % as published, where the table has them",
            "loss": "validation cross-entropy as published, where the table has it",
            "snnet_flops": "snnet's count of the same network (multiply-accumulates, attention included)",
            "snnet_params": "snnet's count of the same network's parameters",
        },
        **({"note": table.note} if table.note else {}),
        "built_by": "scripts/build_reference_results.py",
        "rows": out_rows,
    }


def _license(table: Published) -> str:
    text = f"{SOURCES[table.source].license} (the {SOURCES[table.source].repository} repository's license)"
    if table.path.startswith("stitching_swin/"):
        text += "; the stitching_swin folder also carries the MIT license of Microsoft's Swin code it builds on"
    return text


def summary(folder: Path) -> str:
    """Per table: rows, ids that differ between the reference and snnet, and the FLOPs agreement."""
    lines = []
    for table in PUBLISHED.values():
        data = json.loads((folder / f"{table.name}.json").read_text())
        rows = data["rows"]
        moved = sum(r["id"] != r["ref_id"] for r in rows)
        worst = max(abs(r["snnet_flops"] / r["flops"] - 1) for r in rows)
        params = [abs(r["snnet_params"] / r["params"] - 1) for r in rows if "params" in r]
        best = max(rows, key=lambda r: r["acc1"])
        lines.append(f"{data['name']}: {len(rows)} of {data['networks']} networks; {moved} with another id in snnet; "
                     f"snnet's FLOPs within {100 * worst:.3f} % of the published"
                     + (f", params within {100 * max(params):.3f} %" if params else "")
                     + f"; best top-1 {best['acc1']:.2f} % ({best['name']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sn-net", type=Path, help="a clone or mirror of ziplab/SN-Net")
    parser.add_argument("--sn-net-v2", type=Path, help="a clone or mirror of ziplab/SN-Netv2")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summary", action="store_true", help="print the summary of the files in --out and stop")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.out))
        return
    repos = {"v1": args.sn_net, "v2": args.sn_net_v2}
    if None in repos.values():
        parser.error("give --sn-net and --sn-net-v2 (or --summary)")
    args.out.mkdir(parents=True, exist_ok=True)
    for table in PUBLISHED.values():
        data = build(table, read_published(repos[table.source], table))
        path = args.out / f"{table.name}.json"
        atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))
        print(f"wrote {path} ({len(data['rows'])} rows)")
    print(summary(args.out))


if __name__ == "__main__":
    main()
