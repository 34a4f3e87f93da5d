#!/usr/bin/env python
"""Train a zoo of Fashion-MNIST ViTs of the family's design, one model per architecture.

Each model (any width, heads, depth, patch size or MLP ratio of the DeiT-style design in
``snnet/pretrained.py``, named like ``fmnist_vit_w24_d6_p7``) is trained from scratch with the
family's recipe (``snnet/recipes/fmnist-family.yaml``; ``--recipe fmnist-converged``: no augmentation, 24 epochs) through snnet's training loop
(:func:`snnet.members.train_member`, as ``scripts/train_fmnist_family.py`` trains the family) on
the 50,000 training images outside the validation split, then measured on the validation split
and on the test set after a float16 round trip, like the shipped family. Results are merged, one
row per model, into ``--zoo.json`` (default ``snnet/weights/fmnist_zoo.json``), so models can be
trained by separate processes at the same time; weights go to ``--zoo.weights_dir`` (default
``runs/fmnist_zoo/``, outside git: nothing uses them but research runs), each model's training run
to ``--zoo.runs/<model>``.

    python scripts/train_fmnist_zoo.py --threads 1 --models fmnist_vit_w24_d6_p7 fmnist_vit_w48_d6_p7
    python scripts/train_fmnist_zoo.py --show       # print the zoo table from --zoo.json
    python scripts/train_fmnist_zoo.py --recipe fmnist-converged --no-test --models fmnist_vit_w48_d3_p7 \
        --json runs/converge/e24.json --weights-dir runs/converge/w_e24 --zoo.runs runs/converge/runs_e24
        # a run that chooses settings (here the converged recipe's epochs): the test split unread

Every row keeps the model's validation curve (``val_curve``: top-1 at each epoch's end, from its
run's ``evals.jsonl``), so a run shows whether it stopped rising.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch

import snnet
from snnet.commands.config_cli import Legacy, dump_yaml, parse
from snnet.config import TrainConfig
from snnet.data import VAL_SPLIT_HOW, FashionMNIST
from snnet.errors import SnnetError
from snnet.io import update_json
from snnet.members import command_line, recipe_changes, train_member
from snnet.pretrained import FmnistVitSpec
from snnet.report import human, table
from snnet.train import result_settings

WEIGHTS = Path(snnet.__file__).parent / "weights"
TRAIN_SPLIT = "train"  # the zoo never sees the validation images
PER_MEMBER = ("schedule.epochs",)  # settings each row records for itself, not the zoo file's recipe


@dataclass(frozen=True)
class ZooOptions:
    """Which architectures to train, and where their rows, weights and runs go."""

    models: tuple[str, ...] = ()
    """fmnist_vit_w<width>_d<depth>_p<patch>[_h<heads>][_m<mlp ratio>], or a shipped name."""
    json: str = str(WEIGHTS / "fmnist_zoo.json")
    """The zoo table the rows are merged into."""
    weights_dir: str = "runs/fmnist_zoo"
    """Where each model's float16 weights go."""
    runs: str = "runs/fmnist_zoo/runs"
    """Where each model's training run goes (runs/<model>)."""
    threads: int = 2
    """torch threads."""
    test: bool = True
    """Also measure the test split (false for runs that choose settings: the test split is not read, test top-1 null)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))


LEGACY = {"--epochs": Legacy("schedule.epochs"), "--batch-size": Legacy("data.batch_size"), "--lr": Legacy("optim.lr"),
          "--weight-decay": Legacy("optim.weight_decay"), "--seed": Legacy("run.seed"),
          "--augment": Legacy("data.augment", "true"), "--no-augment": Legacy("data.augment", "false"),
          "--limit": Legacy("data.limit"), "--threads": Legacy("zoo.threads"),
          "--models": Legacy("zoo.models", kind="words"), "--json": Legacy("zoo.json"),
          "--weights-dir": Legacy("zoo.weights_dir"), "--test": Legacy("zoo.test", "true"),
          "--no-test": Legacy("zoo.test", "false"), "--set": Legacy("", kind="set")}


def zoo_row(spec: FmnistVitSpec, r: dict[str, Any], threads: int, command: str) -> dict[str, Any]:
    """One model's row in the zoo file (the schema snnet's zoo tables read)."""
    return {"name": spec.name, "arch": asdict(spec), "params": r["params"], "flops": r["macs"],
            "val_acc1": r["acc"]["val"], "test_acc1": r["acc"].get("test"), "epochs": r["epochs"],
            "image_steps": r["image_steps"], "seconds": r["seconds"], "threads": threads, "command": command,
            "val_curve": r["val_curve"]}


def update_zoo(path: Path, row: dict[str, Any], config: TrainConfig, split: dict[str, Any]) -> None:
    """Merge one model's row into the zoo file (under a lock), ordered by FLOPs.

    A zoo compares models trained alike: a file holding another recipe or split is refused, not overwritten.
    A setting the file's recipe does not hold (added to snnet after it was written) counts as its default.
    The epochs are each member's own (:data:`PER_MEMBER`, in its row): trained until it stops improving,
    a small member needs more than a large one.
    """
    settings = json.loads(json.dumps(result_settings(config)))  # as the file holds it (lists, not tuples)
    recipe = {k: v for k, v in settings.items() if k not in PER_MEMBER}

    def add(zoo: dict[str, Any]) -> dict[str, Any]:
        changed = recipe_changes(zoo.get("recipe", recipe), recipe, PER_MEMBER) if zoo else []
        if zoo and (changed or zoo.get("split") != split):
            what = f"other settings ({', '.join(changed)})" if changed else "another split"
            raise SnnetError(f"{path} holds models trained with {what}: write to another --zoo.json or delete it")
        models = {m["name"]: m for m in zoo.get("models", [])} | {row["name"]: row}
        return {"dataset": "fashion-mnist", "split": split, "recipe": recipe, "torch": torch.__version__,
                "timm": timm.__version__, "models": sorted(models.values(), key=lambda m: (m["flops"], m["name"]))}

    update_json(path, add)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def show(path: Path) -> str:
    """The zoo file as a table; with validation curves, each one's best epoch and its last three epochs too
    (whether the member had stopped rising)."""
    zoo = json.loads(path.read_text())
    rows = [{"name": m["name"], "arch": "w{embed_dim} h{num_heads} d{depth} p{patch_size}".format(**m["arch"]),
             "params": human(m["params"]), "flops": human(m["flops"]), "val": f"{m['val_acc1']:.2f}",
             "test": _pct(m["test_acc1"]), "sec": f"{m['seconds']:.0f}", "img": human(m["image_steps"]),
             **_curve_end(m.get("val_curve") or [])}
            for m in zoo["models"]]
    curves = [("best", "best val (epoch)"), ("end", "last 3 epochs")] if any(m.get("val_curve") for m in zoo["models"]) else []
    return table(rows, [("name", "model"), ("arch", "arch"), ("params", "params"), ("flops", "FLOPs"),
                        ("val", "val top-1 %"), ("test", "test top-1 %"), *curves, ("sec", "train s"),
                        ("img", "image-steps")])


def _curve_end(curve: list[float]) -> dict[str, str]:
    """A validation curve's best top-1 with its epoch (the first, on ties) and its last three epochs."""
    if not curve:
        return {"best": "-", "end": "-"}
    best = max(range(len(curve)), key=lambda k: (curve[k], -k))
    return {"best": f"{curve[best]:.2f} ({best + 1})", "end": " ".join(f"{a:.2f}" for a in curve[-3:])}


def main(argv: list[str] | None = None) -> None:
    parsed = parse(sys.argv[1:] if argv is None else argv, "train_fmnist_zoo.py", legacy=LEGACY,
                   extra={"zoo": ZooOptions}, default_recipe="fmnist-family",
                   flags={"--show": "Print the zoo table from --zoo.json and exit."}, description=__doc__.split("\n\n")[0])
    config, options = parsed.config.override(split=TRAIN_SPLIT), parsed.extra["zoo"]
    if parsed.flags["--print-config"]:
        print(dump_yaml(config, {"zoo": options}), end="")
        return
    if parsed.flags["--show"]:
        print(show(Path(options.json)))
        return
    specs = [FmnistVitSpec.parse(m) for m in options.models]  # every name checked before any training
    if not specs:
        raise SnnetError("name the models to train with --models (e.g. --models fmnist_vit_w24_d6_p7)")
    torch.set_num_threads(options.threads)
    d = config.data
    # runs that choose settings leave the test split unread (--no-test): their rows' test top-1 is null
    splits = ("val", "test") if options.test else ("val",)
    split = {"train": len(FashionMNIST(d.root, TRAIN_SPLIT, limit=d.limit)), "val": len(FashionMNIST(d.root, "val")),
             "test": len(FashionMNIST(d.root, "test")) if options.test else None, "how": VAL_SPLIT_HOW}
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        member = config.override(out_dir=str(Path(options.runs) / spec.name))
        r = train_member(spec.name, "fmnist_vit", spec.model_kwargs(), member, splits, options.weights_dir)
        # written after every model so an interrupted run keeps what it finished
        update_zoo(Path(options.json), zoo_row(spec, r, options.threads, command_line()), config, split)
    print(f"done -> {options.json}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except SnnetError as e:  # bad settings, a refused resume: one line, as snnet's commands say it
        sys.exit(f"error: {e}")
