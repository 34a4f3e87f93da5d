#!/usr/bin/env python
"""Train the shipped Fashion-MNIST anchor family from scratch and write its artifacts.

Trains ``fmnist_vit_ti``, ``fmnist_vit_s`` and ``fmnist_vit_b`` (see ``snnet/pretrained.py``)
with one shared recipe on the 50,000 training images outside the validation split
(``--split train+val``: all 60,000), evaluates on the validation split and the 10k test images,
and writes into ``--out`` (default ``snnet/weights``):

* ``<model>.safetensors`` -- float16 weights (timm upcasts them into float32 params);
* ``family.json``         -- measured params, MACs, val and test accuracy *after* the fp16
  round trip, epochs, wall time, the exact command and library versions;
* ``MODEL_CARD.md``       -- generated from ``family.json`` only.

Everything is seeded and the data order is a function of ``--seed``, so a rerun
with the same command and library versions reproduces the numbers up to
floating-point nondeterminism of the CPU kernels.

    python scripts/train_fmnist_family.py                 # the shipped recipe, one model after another
    python scripts/train_fmnist_family.py --card-only     # regenerate MODEL_CARD.md

The recipe and training loop (``Recipe``, ``fit``, ``train_one``) also train the zoo of
``scripts/train_fmnist_zoo.py``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import timm.optim
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from snnet.data import FASHION_MNIST_CLASSES, FashionMNIST, make_loader, set_epoch  # noqa: E402
from snnet.io import record_checksum  # noqa: E402
from snnet.pretrained import FMNIST_FAMILY  # noqa: E402  (registers the models in timm)


AUGMENT, NO_AUGMENT = "random crop (2px zero padding) + horizontal flip", "none"


@dataclass(frozen=True)
class Recipe:
    """The training recipe shared by every member of the family."""

    epochs: int = 12
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    augment: str = AUGMENT
    seed: int = 0


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image, in snnet's (the paper's, fvcore's)
    convention: the same counter ``snnet stitches`` uses, so the card and the CLI agree."""
    from snnet.flops import count_macs as macs_of, unfused_attention

    with unfused_attention(model), torch.no_grad():
        return macs_of(model.eval(), torch.zeros(1, *input_size))[0]


def lr_lambda(recipe: Recipe, steps_per_epoch: int):
    """Linear warmup then cosine decay to ``min_lr``, as a multiplier of ``lr`` per step."""
    warmup = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    total = recipe.epochs * steps_per_epoch
    floor = recipe.min_lr / recipe.lr

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(-1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / total


def create_model(name: str, kwargs: dict[str, Any], file: Path | None = None) -> nn.Module:
    """A timm model, randomly initialised or (``file``) loaded through timm's pretrained path."""
    if file is None:
        return timm.create_model(name, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)


def fit(model: nn.Module, label: str, recipe: Recipe, train_set: FashionMNIST) -> tuple[list[float], int]:
    """Train ``model`` with the recipe; return each epoch's wall seconds and the optimizer steps taken."""
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = make_loader(train_set, recipe.batch_size, shuffle=True, seed=recipe.seed, drop_last=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, len(loader)))

    epoch_seconds: list[float] = []
    steps = 0
    for epoch in range(recipe.epochs):
        set_epoch(loader, epoch)
        model.train()
        start = time.perf_counter()
        seen = 0
        bar = tqdm(loader, desc=f"{label} {epoch + 1}/{recipe.epochs}", unit="batch", file=sys.stdout,
                   mininterval=10, dynamic_ncols=False, ncols=110)
        for images, labels in bar:
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            steps += 1
            seen += labels.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
        bar.close()
        epoch_seconds.append(time.perf_counter() - start)
        print(f"{label} epoch {epoch + 1}: {epoch_seconds[-1]:.1f} s, "
              f"{len(train_set) / epoch_seconds[-1]:.0f} img/s, last loss {loss.item():.3f}", flush=True)
    return epoch_seconds, steps


def train_one(label: str, name: str, kwargs: dict[str, Any], recipe: Recipe, train_set: FashionMNIST,
              eval_loaders: dict[str, torch.utils.data.DataLoader], out: Path) -> dict[str, Any]:
    """Train one model (timm ``name`` with ``kwargs``) from scratch, save it as ``out/<label>.safetensors``
    in float16, and measure it on every loader in ``eval_loaders`` after reloading that file."""
    torch.manual_seed(recipe.seed)  # same init stream for every model
    model = create_model(name, kwargs)
    epoch_seconds, steps = fit(model, label, recipe, train_set)
    acc_fp32 = {split: evaluate(model, loader) for split, loader in eval_loaders.items()}
    path = out / f"{label}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "arch": label, "dtype": "float16"})
    path.chmod(0o644)  # safetensors writes 0600; the file ships in the wheel

    # Measure what users get: the fp16 file loaded through timm's pretrained path.
    reloaded = create_model(name, kwargs, path)
    acc = {split: evaluate(reloaded, loader) for split, loader in eval_loaders.items()}
    result = {
        "params": sum(p.numel() for p in reloaded.parameters()),
        "macs": count_macs(reloaded, (1, 28, 28)),
        "acc": {k: round(v, 2) for k, v in acc.items()},
        "acc_fp32": {k: round(v, 2) for k, v in acc_fp32.items()},
        "epochs": recipe.epochs,
        "steps": steps,
        "image_steps": steps * recipe.batch_size,
        "seconds": round(sum(epoch_seconds), 1),
        "seconds_per_epoch": round(sum(epoch_seconds) / len(epoch_seconds), 1),
        "file": path.name,
        "file_bytes": path.stat().st_size,
    }
    print(f"{label}: top-1 " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items())
          + f" (fp32 {', '.join(f'{v:.2f}%' for v in acc_fp32.values())}), {result['params']:,} params, "
          f"{result['macs'] / 1e6:.2f} M MACs", flush=True)
    return result


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} %"


def write_model_card(family: dict[str, Any], out: Path) -> None:
    """Render MODEL_CARD.md from family.json, so the card never disagrees with the measurements."""
    models = family["models"]
    recipe = family["recipe"]
    rows = "\n".join(
        f"| `{name}` | {m['arch']['embed_dim']} | {m['arch']['num_heads']} | {m['arch']['depth']} "
        f"| {m['params'] / 1e6:.3f} M | {m['macs'] / 1e6:.2f} M | {_pct(m.get('val_top1'))} | {m['top1']:.2f} % "
        f"| {m['seconds_per_epoch']:.0f} s |"
        for name, m in models.items()
    )
    names = list(models)
    commands = "\n".join(dict.fromkeys(m["command"] for m in models.values()))
    times = ", ".join(f"`{n}` {m['seconds'] / 60:.1f} min ({m['threads']} torch thread(s))" for n, m in models.items())
    small, large = models[names[0]], models[names[-1]]
    card = f"""# Fashion-MNIST anchor family (snnet)

Three DeiT-style Vision Transformers trained from scratch on Fashion-MNIST. They are the
default anchors of snnet's demo: small enough to train on a laptop CPU, yet different
enough in cost and accuracy for stitching to be meaningful (the largest costs
{large['macs'] / small['macs']:.1f}x the MACs of the smallest and is
{large['top1'] - small['top1']:.2f} points more accurate).

Load one with timm once `snnet` is imported:

```python
import snnet, timm
model = timm.create_model("{names[0]}", pretrained=True)  # loads snnet/weights/{small['file']}
```

## Architecture

timm `VisionTransformer`, 28x28x1 input, 7x7 patches (16 tokens + class token), class-token
pooling, pre-norm blocks, MLP ratio 4, 10 classes; widths, heads and depth as listed.

| model | width | heads | depth | params | MACs (1 image) | val top-1 | test top-1 | train time / epoch |
|---|---|---|---|---|---|---|---|---|
{rows}

MACs are counted as `snnet stitches` counts them (the SN-Net paper's fvcore convention: one
multiply-accumulate is one FLOP, attention matmuls and normalisation included), with
`torch.utils.flop_counter.FlopCounterMode` and timm's fused attention disabled. Top-1 is measured on the
10,000-image validation split and the 10,000-image test split **after** reloading the shipped float16 weights through
`timm.create_model(..., pretrained=True)`. Time per epoch is wall time on
{family['machine']} (torch threads as listed below, on a machine shared with other jobs, so
times are indicative only).

## Data

Fashion-MNIST (Xiao et al., 2017, MIT license): 60,000 training and 10,000 test 28x28 grayscale
images of 10 clothing classes ({', '.join(FASHION_MNIST_CLASSES)}), read from the IDX files of
the Debian package `dataset-fashion-mnist`. Normalization: mean 0.2860, std 0.3530.
The models are trained on {family['train_images']:,} images: the training file less a validation
split of 10,000 (1,000 per class, chosen by a hash of the image index so that every machine carves
the same one; `snnet.data.validation_indices`).

**Every choice was made on the validation split, never on the test set.** The three
architectures are members of the Fashion-MNIST zoo's accuracy/FLOPs frontier on the validation
split (`snnet/weights/fmnist_zoo.json`: 18 ViTs of this design trained one by one with this
recipe by `scripts/train_fmnist_zoo.py`), and the demo's learning rate was chosen on it (five
rates from 1.5e-3 to 2.4e-2, each a `snnet demo --eval-split val` run compared with the zoo:
README, "SN-Net against the zoo"). The test split is read once, to report. (An earlier family,
16/32/96 wide and 6 deep, trained on all 60,000 images, had its width of S and its epoch count
chosen from demo runs measured on the test set; this one replaces it. The recipe below, its 12
epochs included, is carried over from it unchanged: the zoo and the family share it, and it was
not tuned on either split.)

## Recipe (identical for all three)

- {recipe['epochs']} epoch(s), batch {recipe['batch_size']}, AdamW lr {recipe['lr']:g}
  (weight decay {recipe['weight_decay']:g}, none on norms/biases/embeddings), linear warmup for
  {recipe['warmup_epochs']:g} epoch then cosine decay to {recipe['min_lr']:g}
- label smoothing {recipe['label_smoothing']:g}, gradient clipping {recipe['grad_clip']:g}
- augmentation: {recipe['augment']}
- seed {recipe['seed']}, deterministic data order; weights stored as float16
  (top-1 before export: {', '.join(f"{m['top1_fp32_before_export']:.2f} %" for m in models.values())})

## Reproduce

```bash
{commands}
```

Each command writes into `--out` (default `snnet/weights/`, where the shipped files live).
torch {family['torch']}, timm {family['timm']}, Python {family['python']}. Models trained
by a command that names several of them are trained one after the other; separate commands
may run in parallel (one per core). Training time (excluding evaluation): {times}.

## Limitations

These are small models trained for only {recipe['epochs']} epoch(s) on a CPU shared with other jobs,
on a toy dataset; they exist to demonstrate and test stitching, not as state-of-the-art
Fashion-MNIST classifiers (longer training improves all three).
"""
    (out / "MODEL_CARD.md").write_text(card)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe's command-line options (shared by the family and the zoo script)."""
    defaults = Recipe()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment != NO_AUGMENT,
                   help="random crops and flips (default: on)")
    p.add_argument("--data", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke test)")
    p.add_argument("--threads", type=int, default=2)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                  seed=args.seed, augment=AUGMENT if args.augment else NO_AUGMENT)


def command_line() -> str:
    """The command that is running, as recorded next to its results."""
    return "python " + shlex.join([str(Path(sys.argv[0]))] + sys.argv[1:])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FMNIST_FAMILY), choices=list(FMNIST_FAMILY))
    add_recipe_args(p)
    # "train" leaves the validation split out (snnet.data.SPLITS): the family, the demo's settings
    # and the zoo comparison are all chosen on it, so the anchors must not have seen it.
    p.add_argument("--split", choices=("train", "train+val"), default="train",
                   help="training images: the 50,000 outside the validation split (default, as shipped) or all 60,000")
    p.add_argument("--out", type=Path, default=REPO / "snnet" / "weights")
    p.add_argument("--card-only", action="store_true", help="only regenerate MODEL_CARD.md from family.json")
    p.add_argument("--recount", action="store_true",
                   help="recount params and MACs of the shipped weights into family.json and the card (no training)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.card_only or args.recount:
        family = json.loads((args.out / "family.json").read_text())
        for name, entry in family["models"].items() if args.recount else ():
            model = create_model(name, {}, args.out / entry["file"])
            entry["params"] = sum(p.numel() for p in model.parameters())
            entry["macs"] = count_macs(model, (1, 28, 28))
            entry.pop("sha256", None)  # recorded by file name, as snnet records every checksum
            record_checksum(family, entry["file"], args.out / entry["file"])
        (args.out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
        write_model_card(family, args.out)
        return
    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    train_set = FashionMNIST(args.data, args.split, augment=args.augment, seed=recipe.seed, limit=args.limit)
    test_loader = make_loader(FashionMNIST(args.data, "test"), 1000, shuffle=False)
    loaders = {"test": test_loader}
    if args.split == "train":  # a family that never saw the validation split is measured on it too
        loaders = {"val": make_loader(FashionMNIST(args.data, "val"), 1000, shuffle=False)} | loaders
    run = {"command": command_line(), "threads": args.threads}
    start = time.perf_counter()
    for name in args.models:
        r = train_one(name, name, {}, recipe, train_set, loaders, args.out)
        result = {"arch": asdict(FMNIST_FAMILY[name]), "params": r["params"], "macs": r["macs"],
                  "top1": r["acc"]["test"], "val_top1": r["acc"].get("val"),
                  "top1_fp32_before_export": r["acc_fp32"]["test"]}
        result |= {k: r[k] for k in ("epochs", "image_steps", "seconds", "seconds_per_epoch", "file", "file_bytes")}
        # Written after every model so an interrupted run keeps what it finished.
        update_family(args.out, name, dict(result, **run), recipe, len(train_set), len(test_loader.dataset))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min -> {args.out}", flush=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of ``path``.

    Models may be trained by separate processes running at the same time (one per core is
    the fastest way to train on a busy machine), each recording its result in one JSON
    file. The lock lives outside the file's folder so that nothing but artifacts lands in
    the package.
    """
    lock_path = Path(tempfile.gettempdir()) / f"snnet-{hashlib.sha1(bytes(path.resolve())).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_family(out: Path, name: str, result: dict[str, Any], recipe: Recipe,
                  train_images: int, test_images: int) -> None:
    """Record one model in family.json (and re-render the card), keeping the other members.

    Entries trained with a different recipe are dropped: the family must share one recipe.
    """
    path = out / "family.json"
    with locked(path):
        family = json.loads(path.read_text()) if path.is_file() else {}
        if family.get("recipe") != asdict(recipe) or family.get("train_images") != train_images:
            family = {}
        family.update({
            "dataset": "fashion-mnist",
            "train_images": train_images,
            "test_images": test_images,
            "recipe": asdict(recipe),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} CPU",
        })
        models = family.setdefault("models", {})
        models[name] = result
        record_checksum(family, result["file"], out / result["file"])  # snnet.pretrained refuses a file that differs
        family["models"] = {n: models[n] for n in FMNIST_FAMILY if n in models}  # size order
        path.write_text(json.dumps(family, indent=2) + "\n")
        if len(family["models"]) > 1:
            write_model_card(family, out)


if __name__ == "__main__":
    main()
