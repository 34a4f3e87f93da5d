"""``snnet train``: train every network of a stitch space at once (one process or torchrun)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import DEFAULT_ANCHORS, AnchorsOpt, read_routes, split_names
from ..errors import SnnetError
from ..sampling import ROS_GAP


def train(
    anchors: AnchorsOpt = DEFAULT_ANCHORS,
    data: Annotated[str, typer.Option("--data", help="'fashion-mnist', an ImageFolder directory, or a timm dataset name (torch/cifar10...).")] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where the dataset lives (Fashion-MNIST IDX files, timm dataset root).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs over the training set.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps (the LR schedule spans them).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step and process.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 5e-5,
    anchor_lr_scale: Annotated[float, typer.Option("--anchor-lr-scale", help="LR multiplier for the anchors' own parameters.")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps before the cosine decay.")] = 0,
    sampler: Annotated[str, typer.Option(help="Stitch sampling: 'uniform', 'flops_bucketed' or 'ros' (SN-Netv2's resource-constrained sampling).")] = "uniform",
    num_buckets: Annotated[int, typer.Option("--num-buckets", help="FLOPs buckets of the flops_bucketed sampler.")] = 4,
    ros_gap: Annotated[float, typer.Option("--ros-gap", help="ROS: FLOPs gap that opens a new group, as a share of the space's FLOPs range.")] = ROS_GAP,
    ros_ramp: Annotated[Optional[float], typer.Option("--ros-ramp", help="ROS: draw the i-th cheapest of G groups with weight i/K + 1/G (default: uniformly).")] = None,
    two_way: Annotated[bool, typer.Option("--two-way", help="SN-Netv2's space: small->large, large->small and round trips.")] = False,
    routes: Annotated[Optional[Path], typer.Option("--routes", help="Train exactly these stitches: `snnet stitches --select klas --json` output, or one route name per line.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="Low-rank stitching layers (SN-Netv2): rank of the trained update on the frozen least-squares weight (0: full layers; default 0, or as saved with --init).")] = None,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="Scale of the low-rank update is alpha / rank.")] = 1.0,
    distill: Annotated[Optional[str], typer.Option(help="Distil from 'largest' (the largest anchor, frozen) or a timm model name.")] = None,
    ckpt_every: Annotated[int, typer.Option("--ckpt-every", help="Steps between checkpoints (0: only at the end).")] = 500,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoint.pt, metrics.jsonl, final/).")] = Path("runs/snnet"),
    resume: Annotated[Optional[str], typer.Option(help="Checkpoint file or directory to resume, or 'auto' (OUT/checkpoint.pt if present).")] = None,
    amp: Annotated[str, typer.Option(help="'auto' (float16 on CUDA, off on CPU), 'bf16', 'fp16' or 'off'.")] = "auto",
    stitch_sync: Annotated[str, typer.Option("--stitch-sync", help="Under torchrun: 'per_rank' (each process its own stitch) or 'shared'.")] = "per_rank",
    limit_train: Annotated[Optional[int], typer.Option("--limit-train", help="Use only the first N training images (quick runs).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, stitch sampling and augmentation.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1... (default: cuda if available).")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Download timm weights (default: only snnet's shipped fmnist family loads its weights).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated local weight files, one per anchor.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from a saved stitched network directory (snnet.load) instead of --anchors.")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Give the anchors a new head with this many classes.")] = None,
    init_images: Annotated[int, typer.Option("--init-images", help="Images for the least-squares init of stitching layers (0: skip).")] = 100,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Train-time augmentation.")] = True,
    workers: Annotated[int, typer.Option("--workers", help="Data loader worker processes.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train all stitches of a family jointly (SN-Net); checkpoints resume to the identical run.

    Many processes: ``torchrun --nproc_per_node N -m snnet train ...`` (gloo on CPU, nccl on CUDA).
    """
    import torch

    from ..data import build_dataset
    from ..model import StitchedNet, create_snnet
    from ..train import OptimConfig, TrainConfig, train as run

    # validate every option before building anything
    tconf = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, sampler=sampler, num_buckets=num_buckets,
                        ros_gap=ros_gap, ros_ramp=ros_ramp, seed=seed, amp=amp, distill=distill, ckpt_every=ckpt_every, out_dir=str(out), resume=resume,
                        stitch_sync=stitch_sync, init_images=0 if init is not None else init_images, num_workers=workers,
                        device=device, progress=progress)
    oconf = OptimConfig(lr=lr, anchor_lr_scale=anchor_lr_scale, weight_decay=weight_decay, warmup_steps=warmup_steps)
    route_names = read_routes(routes) if routes is not None else None
    if init is not None:
        if two_way or route_names is not None:
            raise SnnetError("--init starts from a saved network, whose stitch space is fixed: drop --two-way/--routes")
        net = StitchedNet.from_pretrained(init)
        if lora_rank is not None and (lora_rank, lora_alpha) != (net.lora_rank, net.lora_alpha):
            net.set_lora_rank(lora_rank, lora_alpha)  # a new rank: the saved layers' map is kept, merged if 0
    else:
        names = split_names(anchors)
        files = [w.strip() for w in weights.split(",")] if weights else None
        if files is not None and len(files) != len(names):
            raise SnnetError(f"--weights gives {len(files)} files for {len(names)} anchors; give one per anchor")
        net = create_snnet(_specs(names, pretrained, files), num_classes=num_classes, two_way=two_way, routes=route_names,
                           lora_rank=lora_rank or 0, lora_alpha=lora_alpha)

    started = _init_distributed(device)
    try:
        dataset = build_dataset(data, "train", net.anchors[0].data_config, augment=augment, limit=limit_train,
                                root=data_dir, seed=seed)
        result = run(net, dataset, tconf, oconf)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if result.final_dir is not None:
        typer.echo(f"trained {result.step} steps in {result.seconds:.0f}s ({result.images_per_second:.0f} img/s), "
                   f"last loss {result.loss:.4f}; network saved to {result.final_dir}, checkpoint {result.checkpoint}")


def _specs(names: list[str], pretrained: bool | None, files: list[str] | None):
    """One AnchorSpec per name: shipped fmnist weights by default, timm downloads with --pretrained."""
    from ..anchors import AnchorSpec
    from ..pretrained import FMNIST_FAMILY, normalize_name

    specs = []
    for k, name in enumerate(names):
        shipped = normalize_name(name).partition(".")[0] in FMNIST_FAMILY
        want = pretrained if pretrained is not None else shipped
        specs.append(AnchorSpec(name, want and not files, files[k] if files else None))
    return specs


def _init_distributed(device: str | None) -> bool:
    """Join the torchrun process group (env:// rendezvous) when launched with WORLD_SIZE > 1."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True
