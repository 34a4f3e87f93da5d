"""``snnet demo``: the README's main command."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..demo import DemoConfig, run_demo

_D = DemoConfig()


def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for results.json, results.csv, pareto.html, pareto.png, summary.json.")] = _D.out,
    weights: Annotated[Optional[str], typer.Option(help="The anchors' weights instead of the shipped family: a folder of .safetensors files, or comma-separated files, each named after its architecture as scripts/train_fmnist_family.py and train_fmnist_zoo.py write them (fmnist_vit_s, fmnist_vit_w24_d6_p7, ...).")] = None,
    eval_split: Annotated[str, typer.Option(help="Where stitches are measured: test, or val (the 10,000 validation images carved from the training set; make choices there).")] = _D.eval_split,
    steps: Annotated[int, typer.Option(help="Joint training steps (one sampled stitch each); more steps, better stitches.")] = _D.steps,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = _D.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of the stitching layers.")] = _D.lr,
    anchor_lr_scale: Annotated[float, typer.Option(help="The anchors' learning rate as a fraction of --lr.")] = _D.anchor_lr_scale,
    augment: Annotated[bool, typer.Option(help="Random crops and flips while training.")] = _D.augment,
    sampler: Annotated[str, typer.Option(help="How each step picks its stitch: uniform, or flops_bucketed (every part of the FLOPs range gets the same share of steps).")] = _D.sampler,
    distill: Annotated[bool, typer.Option(help="Distil from a frozen copy of the largest anchor while training.")] = _D.distill,
    distill_alpha: Annotated[float, typer.Option(help="Weight of the distillation loss (0..1; the rest is cross-entropy).")] = _D.distill_alpha,
    two_way: Annotated[bool, typer.Option("--two-way", help="SN-Netv2's space: also large->small stitches and round trips.")] = _D.two_way,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="SN-Netv2's low-rank stitching layers of this rank (0: full layers).")] = _D.lora_rank,
    zoo: Annotated[bool, typer.Option(help="Compare with the Fashion-MNIST zoo (ViTs of the same design trained alone): rows, plot and verdict.")] = _D.zoo,
    data_dir: Annotated[Optional[str], typer.Option("--data", help="Folder with the four Fashion-MNIST IDX files (default: Debian's).")] = None,
    download: Annotated[bool, typer.Option(help="Download Fashion-MNIST with torchvision if it is not on disk.")] = False,
    eval_limit: Annotated[Optional[int], typer.Option(help="Evaluate on the first N images of --eval-split (default: all 10,000).")] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="Train on the first N training images (default: all 50,000 outside the validation split).")] = None,
    quick: Annotated[bool, typer.Option(help="A smoke run in seconds: 20 steps, 1,000 test images.")] = False,
    seed: int = _D.seed,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Build an SN-Net from the shipped Fashion-MNIST family, train it briefly, evaluate every stitch, plot the Pareto frontier and switch stitches by budget."""
    if quick:
        steps, eval_limit, train_limit = min(steps, 20), eval_limit or 1000, train_limit or 5000
    files = tuple(w.strip() for w in weights.split(",") if w.strip()) if weights else ()
    cfg = DemoConfig(out=out, weights=files, eval_split=eval_split, data_dir=data_dir, download=download, steps=steps, batch_size=batch_size, lr=lr,
                     anchor_lr_scale=anchor_lr_scale, augment=augment, sampler=sampler, distill=distill, distill_alpha=distill_alpha, two_way=two_way, lora_rank=lora_rank, zoo=zoo, train_limit=train_limit, eval_limit=eval_limit, seed=seed,
                     device=device, progress=progress)
    run_demo(cfg, echo=typer.echo)
