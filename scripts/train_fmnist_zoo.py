#!/usr/bin/env python
"""Train a zoo of Fashion-MNIST ViTs of the family's design, one model per architecture.

Each model (any width, heads, depth, patch size or MLP ratio of the DeiT-style design in
``snnet/pretrained.py``, named like ``fmnist_vit_w24_d6_p7``) is trained from scratch with the
family's recipe (``scripts/train_fmnist_family.py``: same ``Recipe``, same training loop) on
the 50,000 training images outside the validation split, then measured on the validation
split and on the test set after a float16 round trip, like the shipped family. Results are
merged, one row per model, into ``--json`` (default ``snnet/weights/fmnist_zoo.json``), so models
can be trained by separate processes at the same time; weights go to ``--weights-dir``
(default ``runs/fmnist_zoo/``, outside git: nothing uses them but research runs).

    python scripts/train_fmnist_zoo.py --threads 1 --models fmnist_vit_w24_d6_p7 fmnist_vit_w48_d6_p7
    python scripts/train_fmnist_zoo.py --show       # print the zoo table from --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the family script, beside this one
from train_fmnist_family import (  # noqa: E402
    REPO, Recipe, add_recipe_args, command_line, locked, recipe_from_args, train_one,
)

from snnet.data import VAL_SPLIT_HOW, FashionMNIST, make_loader  # noqa: E402
from snnet.errors import SnnetError  # noqa: E402
from snnet.pretrained import FmnistVitSpec  # noqa: E402
from snnet.report import human, table  # noqa: E402

TRAIN_SPLIT = "train"  # the zoo never sees the validation images


def zoo_row(spec: FmnistVitSpec, r: dict[str, Any], threads: int, command: str) -> dict[str, Any]:
    """One model's row in the zoo file (the schema snnet's zoo tables read)."""
    return {"name": spec.name, "arch": asdict(spec), "params": r["params"], "flops": r["macs"],
            "val_acc1": r["acc"]["val"], "test_acc1": r["acc"]["test"], "epochs": r["epochs"],
            "image_steps": r["image_steps"], "seconds": r["seconds"], "threads": threads, "command": command}


def update_zoo(path: Path, row: dict[str, Any], recipe: Recipe, split: dict[str, Any]) -> None:
    """Merge one model's row into the zoo file (under a lock), ordered by FLOPs.

    A zoo compares models trained alike: a file holding another recipe or split is refused,
    not overwritten.
    """
    with locked(path):
        zoo = json.loads(path.read_text()) if path.is_file() else {}
        if zoo and (zoo.get("recipe") != asdict(recipe) or zoo.get("split") != split):
            raise SnnetError(f"{path} holds models trained with another recipe or split ({zoo.get('recipe')}, "
                             f"{zoo.get('split')}); write to another --json or delete it")
        models = {m["name"]: m for m in zoo.get("models", [])} | {row["name"]: row}
        zoo = {"dataset": "fashion-mnist", "split": split, "recipe": asdict(recipe),
               "torch": torch.__version__, "timm": timm.__version__,
               "models": sorted(models.values(), key=lambda m: (m["flops"], m["name"]))}
        path.write_text(json.dumps(zoo, indent=2) + "\n")


def show(path: Path) -> str:
    """The zoo file as a table."""
    zoo = json.loads(path.read_text())
    rows = [{"name": m["name"], "arch": "w{embed_dim} h{num_heads} d{depth} p{patch_size}".format(**m["arch"]),
             "params": human(m["params"]), "flops": human(m["flops"]), "val": f"{m['val_acc1']:.2f}",
             "test": f"{m['test_acc1']:.2f}", "sec": f"{m['seconds']:.0f}", "img": human(m["image_steps"])}
            for m in zoo["models"]]
    return table(rows, [("name", "model"), ("arch", "arch"), ("params", "params"), ("flops", "FLOPs"),
                        ("val", "val top-1 %"), ("test", "test top-1 %"), ("sec", "train s"),
                        ("img", "image-steps")])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[], metavar="NAME",
                   help="fmnist_vit_w<width>_d<depth>_p<patch>[_h<heads>][_m<mlp ratio>], or a shipped name")
    add_recipe_args(p)
    p.add_argument("--json", type=Path, default=REPO / "snnet" / "weights" / "fmnist_zoo.json")
    p.add_argument("--weights-dir", type=Path, default=REPO / "runs" / "fmnist_zoo")
    p.add_argument("--show", action="store_true", help="print the zoo table from --json and exit")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.show:
        print(show(args.json))
        return
    try:
        specs = [FmnistVitSpec.parse(m) for m in args.models]  # every name checked before any training
    except SnnetError as e:
        sys.exit(f"error: {e}")
    if not specs:
        sys.exit("error: name the models to train with --models (e.g. --models fmnist_vit_w24_d6_p7)")
    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    train_set = FashionMNIST(args.data, TRAIN_SPLIT, augment=args.augment, seed=recipe.seed, limit=args.limit)
    loaders = {s: make_loader(FashionMNIST(args.data, s), 1000, shuffle=False) for s in ("val", "test")}
    split = {"train": len(train_set), "val": len(loaders["val"].dataset), "test": len(loaders["test"].dataset),
             "how": VAL_SPLIT_HOW}
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for spec in specs:
        r = train_one(spec.name, "fmnist_vit", spec.model_kwargs(), recipe, train_set, loaders, args.weights_dir)
        # Written after every model so an interrupted run keeps what it finished.
        update_zoo(args.json, zoo_row(spec, r, args.threads, command_line()), recipe, split)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min -> {args.json}", flush=True)


if __name__ == "__main__":
    main()
