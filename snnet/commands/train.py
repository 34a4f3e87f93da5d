"""``snnet train``: train every network of a stitch space at once (one process or torchrun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import DEFAULT_ANCHORS, AnchorsOpt, read_routes, split_names
from ..errors import SnnetError
from ..sampling import ROS_GAP


def train(
    ctx: typer.Context,
    anchors: AnchorsOpt = DEFAULT_ANCHORS,
    data: Annotated[str, typer.Option("--data", help="'fashion-mnist', an ImageFolder directory, or a timm dataset name (torch/cifar10...).")] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where the dataset lives (Fashion-MNIST IDX files, timm dataset root).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs over the training set.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps (the LR schedule spans them).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step and process.")] = 64,
    lr: Annotated[float, typer.Option(help="Base learning rate at a global batch of 512: the rate used is lr x batch x processes / 512 (printed at start). 4e-4 = 5e-5 at batch 64.")] = 4e-4,
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
    # ---- recipes, distillation and regularisers (snnet/recipes.py); a recipe sets every option above you do not give
    recipe: Annotated[Optional[str], typer.Option(help="The paper's recipe for a family: deit, swin, resnet, resnet-swin, levit (every value and its source: --print-recipe).")] = None,
    print_recipe: Annotated[bool, typer.Option("--print-recipe", help="Print the resolved recipe and learning rates, then exit.")] = False,
    set_fields: Annotated[Optional[list[str]], typer.Option("--set", help="Override any recipe field: --set mixup=0 --set warmup_lr=none (repeatable).")] = None,
    distill_type: Annotated[Optional[str], typer.Option("--distill-type", help="'hard' (cross-entropy on the teacher's top class, DeiT) or 'soft' (KL). Default: the recipe's.")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear warm-up in epochs (used when --warmup-steps is 0). Default: the recipe's.")] = None,
    drop_path: Annotated[Optional[float], typer.Option("--drop-path", help="Stochastic depth rate of the anchors (timm's drop_path_rate). Default: the recipe's.")] = None,
    ddp_grads: Annotated[str, typer.Option("--ddp-grads", help="Under torchrun with per-rank stitches: 'mean' (DDP's mean over all processes) or 'users' (mean over the processes whose route used each parameter).")] = "mean",
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
    from ..recipes import RecipeError, get_recipe
    from ..runlock import check_run_folder
    from ..train import train as run

    # validate every option before building anything: the recipe, what the command line changes, the configs
    given = {name: value for name, value in ctx.params.items()
             if name in _RECIPE_OPTIONS and _from_command_line(ctx, name)}
    rec = get_recipe(recipe).override(**{_RECIPE_OPTIONS[k]: v for k, v in given.items()})
    rec = rec.override_text(set_fields or [])
    world = _world_size()
    tconf, oconf = rec.configs(world_size=world, max_steps=max_steps, seed=seed, ckpt_every=ckpt_every, out_dir=str(out),
                               resume=resume, stitch_sync=stitch_sync, num_buckets=num_buckets,
                               ros_gap=ros_gap, ros_ramp=ros_ramp,
                               init_images=0 if init is not None else rec.init_images, num_workers=workers,
                               device=device, progress=progress, ddp_grads=ddp_grads, overwrite=overwrite)
    if print_recipe:
        typer.echo(rec.describe(world))
        return
    asked_drop_path = "drop_path" in given or any(f.replace("-", "_").startswith("drop_path=") for f in set_fields or [])
    if init is not None and asked_drop_path and rec.drop_path > 0:
        raise RecipeError("drop-path is set when the anchors are built; a network loaded with --init keeps its own: "
                          "drop --drop-path / --set drop_path")
    _check_inputs(data, data_dir, limit_train, num_classes, weights, rec.distill)
    if check_run_folder(out, resume, overwrite) is None and resume == "auto":
        typer.echo(f"no checkpoint in {out}: --resume auto starts a fresh run", err=True)
    route_names = read_routes(routes) if routes is not None else None
    seed_everything(seed)  # random-init anchors and heads follow --seed
    if init is not None:
        if two_way or route_names is not None:
            raise SnnetError("--init starts from a saved network, whose stitch space is fixed: drop --two-way/--routes")
        net = StitchedNet.from_pretrained(init)
        if lora_rank is not None and (lora_rank, lora_alpha) != (net.lora_rank, net.lora_alpha):
            net.set_lora_rank(lora_rank, lora_alpha)  # a new rank: the saved layers' map is kept, merged if 0
    else:
        names = split_names(rec.anchors)
        files = [w.strip() for w in weights.split(",")] if weights else None
        if files is not None and len(files) != len(names):
            raise SnnetError(f"--weights gives {len(files)} files for {len(names)} anchors; give one per anchor")
        # a spec carries its own model arguments: create_snnet's num_classes applies to bare names only
        kwargs = tuple(sorted(rec.anchor_kwargs() + ((("num_classes", num_classes),) if num_classes else ())))
        specs = _specs(names, pretrained, files, kwargs)
        if any(s.pretrained for s in specs):  # anchors snnet cannot split fail here, before any download
            create_snnet([s.name for s in specs], num_classes=num_classes, device="meta")
        net = create_snnet(specs, two_way=two_way, routes=route_names, lora_rank=lora_rank or 0,
                           lora_alpha=lora_alpha)

    started = _init_distributed(device)
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"{rec.name}: {rec.rates(world, oconf)}")
        dataset = build_dataset(data, "train", net.anchors[0].data_config, augment=rec.augment, limit=limit_train,
                                root=data_dir, seed=seed, transform_options=rec.transform_options() if rec.augment else None)
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


# Options of `snnet train` that are recipe fields: given on the command line, they override the recipe.
_RECIPE_OPTIONS = {"anchors": "anchors", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                   "anchor_lr_scale": "anchor_lr_scale", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps",
                   "sampler": "sampler", "distill": "distill", "amp": "amp", "init_images": "init_images",
                   "augment": "augment", "distill_type": "distill_type", "warmup_epochs": "warmup_epochs",
                   "drop_path": "drop_path"}


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default).

    Compared by name: typer ships its own copy of click, whose ParameterSource is another class."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE), for the linear scaling rule."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise SnnetError(f"WORLD_SIZE={text!r} is not a number of processes")
    return int(text)


def _specs(names: list[str], pretrained: bool | None, files: list[str] | None, kwargs: tuple = ()):
    """One AnchorSpec per name: shipped fmnist weights by default, timm downloads with --pretrained."""
    from ..anchors import AnchorSpec
    from ..pretrained import FMNIST_FAMILY, normalize_name

    specs = []
    for k, name in enumerate(names):
        shipped = normalize_name(name).partition(".")[0] in FMNIST_FAMILY
        want = pretrained if pretrained is not None else shipped
        specs.append(AnchorSpec(name, want and not files, files[k] if files else None, kwargs))
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
