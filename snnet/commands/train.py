"""``snnet train``: train every network of a stitch space at once (one process or torchrun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import DEFAULT_ANCHORS, AnchorsOpt, split_names
from ..errors import SnnetError


def train(
    ctx: typer.Context,
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
    sampler: Annotated[str, typer.Option(help="Stitch sampling: 'uniform' or 'flops_bucketed'.")] = "uniform",
    num_buckets: Annotated[int, typer.Option("--num-buckets", help="FLOPs buckets of the flops_bucketed sampler.")] = 4,
    distill: Annotated[Optional[str], typer.Option(help="Distil from 'largest' (the largest anchor, frozen) or a timm model name.")] = None,
    ckpt_every: Annotated[int, typer.Option("--ckpt-every", help="Steps between checkpoints (0: only at the end).")] = 500,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoint.pt, metrics.jsonl, final/).")] = Path("runs/snnet"),
    resume: Annotated[Optional[str], typer.Option(help="Checkpoint file or directory to resume, or 'auto' (OUT/checkpoint.pt if present).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run already in --out (checkpoint, metrics, final/) and start afresh; without it (or --resume) such a folder is refused.")] = False,
    amp: Annotated[str, typer.Option(help="'auto' (float16 on CUDA, off on CPU), 'bf16', 'fp16' or 'off'.")] = "auto",
    stitch_sync: Annotated[str, typer.Option("--stitch-sync", help="Under torchrun: 'per_rank' (each process its own stitch) or 'shared'.")] = "per_rank",
    limit_train: Annotated[Optional[int], typer.Option("--limit-train", help="Use only the first N training images (quick runs).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything random: random-init weights, data order, stitch sampling, augmentation.")] = 0,
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
    Ctrl-C finishes the step in progress, writes a checkpoint and prints the command that resumes it.
    """
    import torch

    from ..checkpoint import seed_everything
    from ..data import build_dataset
    from ..errors import TrainingInterrupted
    from ..model import StitchedNet, create_snnet
    from ..runlock import check_run_folder
    from ..train import OptimConfig, TrainConfig, train as run

    # validate every option before building anything
    tconf = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, sampler=sampler, num_buckets=num_buckets,
                        seed=seed, amp=amp, distill=distill, ckpt_every=ckpt_every, out_dir=str(out), resume=resume,
                        stitch_sync=stitch_sync, init_images=0 if init is not None else init_images, num_workers=workers,
                        device=device, progress=progress, overwrite=overwrite)
    oconf = OptimConfig(lr=lr, anchor_lr_scale=anchor_lr_scale, weight_decay=weight_decay, warmup_steps=warmup_steps)
    _check_inputs(data, data_dir, limit_train, num_classes, weights, distill)
    if check_run_folder(out, resume, overwrite) is None and resume == "auto":
        typer.echo(f"no checkpoint in {out}: --resume auto starts a fresh run", err=True)
    seed_everything(seed)  # random-init anchors and heads follow --seed
    if init is not None:
        net = StitchedNet.from_pretrained(init)
    else:
        names = split_names(anchors)
        files = [w.strip() for w in weights.split(",")] if weights else None
        if files is not None and len(files) != len(names):
            raise SnnetError(f"--weights gives {len(files)} files for {len(names)} anchors; give one per anchor")
        net = create_snnet(_specs(names, pretrained, files), num_classes=num_classes)

    started = _init_distributed(device)
    try:
        dataset = build_dataset(data, "train", net.anchors[0].data_config, augment=augment, limit=limit_train,
                                root=data_dir, seed=seed)
        result = run(net, dataset, tconf, oconf)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per process
            typer.echo(f"stopped by {e.signal_name} at step {e.step} of {e.total}; checkpoint written to "
                       f"{e.checkpoint}. Resume with: {_resume_command(ctx)}", err=True)
        sys.exit(143 if e.signal_name == "SIGTERM" else 130)  # 128 + the signal, as if it had killed us
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if result.finished and not result.stitches:  # resumed a run that had already ended
        typer.echo(f"the run in {out} had already finished ({result.step} of {result.total_steps} steps): nothing to "
                   f"train. Its network is in {result.final_dir}; to train it further, start a new run from it with "
                   f"--init {result.final_dir} --out NEW_FOLDER")
    elif result.final_dir is not None:
        typer.echo(f"trained {result.step} steps in {result.seconds:.0f}s ({result.images_per_second:.0f} img/s), "
                   f"last loss {result.loss:.4f}; network saved to {result.final_dir}, checkpoint {result.checkpoint}")


def _check_inputs(data: str, data_dir: Path | None, limit_train: int | None, num_classes: int | None,
                  weights: str | None, distill: str | None) -> None:
    """What TrainConfig/OptimConfig cannot check: the command's own options, before any model is built."""
    from ..anchors import resolve_name
    from ..data import check_source
    from ..errors import ConfigError

    if limit_train is not None and limit_train < 1:
        raise ConfigError(f"--limit-train must be >= 1, got {limit_train}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {num_classes}")
    missing = [w.strip() for w in (weights or "").split(",") if w.strip() and not Path(w.strip()).is_file()]
    if missing:
        raise SnnetError(f"--weights: no file {', '.join(missing)}")
    if distill not in (None, "largest"):
        resolve_name(distill)  # an unknown teacher fails now, not after the stitching layers are fitted
    check_source(data, "train", data_dir)


def _resume_command(ctx: typer.Context) -> str:
    """This very command line with --resume auto (and without --resume/--overwrite), rebuilt from
    the options given on it, so it works however snnet was called (script, -m, in-process)."""
    import shlex

    words: list[str] = []
    for param in ctx.command.params:
        if param.name in ("resume", "overwrite") or param.name not in ctx.params:
            continue
        if ctx.get_parameter_source(param.name).name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if isinstance(value, bool):
            flags = param.opts if value or not param.secondary_opts else param.secondary_opts
            words.append(flags[0])
        else:
            words += [param.opts[0], str(value)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world), "-m", "snnet"] if world > 1 else ["snnet"]
    return shlex.join([*launcher, ctx.info_name or "train", *words, "--resume", "auto"])


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
