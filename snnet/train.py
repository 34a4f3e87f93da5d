"""Training a stitched network: the SN-Net recipe, resumable to the bit, on one or many processes.

Every step samples one stitch (``net.select`` happens *outside* forward), runs that route on a
batch, and updates only the parameters on the route: the anchors' blocks it passes through and
the stitching layers between them. Over many steps every network of the space gets trained, which is
what makes all of them usable at once.

    from snnet.train import TrainConfig, OptimConfig, train
    result = train(net, dataset, TrainConfig(epochs=5, out_dir="runs/x"), OptimConfig(lr=5e-5))

Checkpoints hold everything that decides the future of a run (weights, optimizer, schedule,
scaler, stitch sampler, data position, every RNG), so a run resumed from one ends with exactly
the weights an uninterrupted run would have.

Many processes (``torchrun --nproc_per_node N -m snnet train ...``): every rank samples its own
stitch per step, as in the paper. DistributedDataParallel averages gradients over all N ranks,
so a parameter on the route of only k of the N ranks would get k/N of its mean gradient — the
stitching layers (each on few routes) would learn N times slower than the anchors' shared early
blocks. snnet corrects this: after backward it all-reduces a per-parameter count of the ranks
whose route used it and rescales each gradient by N/count, so every parameter gets the *mean over
the ranks that used it* (a parameter used by one rank gets exactly the gradient that rank computed,
as in single-process training); a parameter no rank used gets no gradient (AdamW leaves it and its
moments untouched, as in single-process training). ``stitch_sync='shared'`` instead makes all
ranks use one stitch per step (same sampler seed everywhere): plain DDP averaging is then exact,
at the price of fewer stitches visited per step.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import DatasetError, num_classes as dataset_classes
from .errors import CheckpointError, SnnetError, TrainingError
from .report import progress as report_progress
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, load_checkpoint, resolve_resume, rng_state,
                         save_checkpoint, set_rng_state)
from .model import StitchedNet
from .sampling import ROS_GAP, SAMPLERS, EpochSampler, make_stitch_sampler
from .space import Stitch

METRICS_NAME = "metrics.jsonl"
STITCH_SYNC = ("per_rank", "shared")
AMP_MODES = ("auto", "off", "fp16", "bf16")
# Config fields that must not change when a run is resumed: they decide which batches and
# stitches come next, so changing them would silently make a different run.
_RESUME_FIXED = ("batch_size", "seed", "sampler", "num_buckets", "ros_gap", "ros_ramp", "stitch_sync")


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (the DeiT/SN-Net recipe).

    ``anchor_lr_scale`` multiplies the learning rate of the anchors' own parameters: the
    stitching layers start from a least-squares fit and need to move, the pretrained anchors
    less so (1.0 = the paper's single learning rate).
    """

    lr: float = 5e-5
    anchor_lr_scale: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    min_lr: float = 1e-6
    clip_grad: float | None = 5.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise SnnetError(f"lr must be > 0, got {self.lr}")
        bad = {k: v for k, v in (("anchor_lr_scale", self.anchor_lr_scale), ("weight_decay", self.weight_decay),
                                 ("min_lr", self.min_lr)) if v < 0}
        if bad:
            raise SnnetError(f"{', '.join(bad)} must be >= 0, got {', '.join(f'{k}={v}' for k, v in bad.items())}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise SnnetError(f"clip_grad must be positive or None, got {self.clip_grad}")


@dataclass(frozen=True)
class TrainConfig:
    """What to train for, how to sample stitches, and where to write.

    ``batch_size`` is per process (the global batch is ``batch_size * world_size``).
    ``max_steps`` caps the run below ``epochs`` (the schedule spans the capped length).
    ``amp``: ``'auto'`` = float16 autocast + GradScaler on CUDA, off on CPU; ``'bf16'``
    autocasts to bfloat16 on any device; ``'off'``.
    ``distill``: None, ``'largest'`` (a frozen copy of the largest anchor, taken at the start)
    or a timm model name (built pretrained, with the network's number of classes).
    ``ckpt_every``: steps between checkpoints (0 = only at the end).
    ``resume``: a checkpoint path, ``'auto'`` (``out_dir/checkpoint.pt`` if it exists) or None.
    ``init_images``: calibration images for the least-squares init of the stitching layers
    (0 = keep the layers as they are, e.g. when starting from a saved stitched network).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    sampler: str = "uniform"
    num_buckets: int = 4
    ros_gap: float = ROS_GAP  # ROS (SN-Netv2): FLOPs gap between groups, as a share of the space's FLOPs range
    ros_ramp: float | None = None  # ROS: None draws groups uniformly; k weights the i-th cheapest i/k + 1/G
    seed: int = 0
    amp: str = "auto"
    label_smoothing: float = 0.1
    distill: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    ckpt_every: int = 0
    out_dir: str = "runs/snnet"
    resume: str | None = None
    log_every: int = 10
    stitch_sync: str = "per_rank"
    init_images: int = 100
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SnnetError(msg)

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        need(self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; use one of {SAMPLERS}")
        need(self.num_buckets >= 1, f"num_buckets must be >= 1, got {self.num_buckets}")
        need(self.ros_gap >= 0 and (self.ros_ramp is None or self.ros_ramp > 0),
             f"ros_gap must be >= 0 and ros_ramp > 0 (or None), got {self.ros_gap}, {self.ros_ramp}")
        need(self.amp in AMP_MODES, f"unknown amp mode {self.amp!r}; use one of {AMP_MODES}")
        need(self.stitch_sync in STITCH_SYNC, f"unknown stitch_sync {self.stitch_sync!r}; use one of {STITCH_SYNC}")
        need(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        need(self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.ckpt_every >= 0 and self.log_every >= 1 and self.init_images >= 0,
             "ckpt_every and init_images must be >= 0 and log_every >= 1")


@dataclass(frozen=True)
class TrainResult:
    """How a call to :func:`train` ended."""

    step: int  # global steps done (including those before a resume)
    total_steps: int
    finished: bool  # False when stopped early by ``stop_after``
    loss: float  # mean loss of the last logged window
    seconds: float
    images_per_second: float
    out_dir: Path
    checkpoint: Path | None
    final_dir: Path | None
    stitches: tuple[int, ...] = field(default=(), repr=False)  # stitch id of every step this call ran (this rank)


# ---------------------------------------------------------------------------- the step engine


def route_modules(net: StitchedNet, stitch: Stitch) -> list[nn.Module]:
    """The modules the route of ``stitch`` runs, flat (exactly what :meth:`StitchedNet.forward` calls)."""
    return list(net.route(stitch).modules())


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def default_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, else CUDA if there is one, else CPU; a bare 'cuda' becomes this process's GPU (LOCAL_RANK)."""
    device = torch.device(name) if name is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class Trainer:
    """One optimisation step at a time: stitch sampling, AMP, DDP with gradient correction, AdamW.

    :func:`train` drives it over a dataset with checkpoints and logs; use it directly for a
    custom loop. ``total_steps`` sizes the LR schedule.
    """

    def __init__(self, net: StitchedNet, config: TrainConfig = TrainConfig(), optim: OptimConfig = OptimConfig(), *,
                 total_steps: int, warmup_steps: int | None = None, teacher: nn.Module | None = None,
                 device: str | torch.device | None = None) -> None:
        self.net, self.config, self.optim = net, config, optim
        self.rank, self.world_size = _dist()
        self.device = default_device(device or config.device)
        net.to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.total_steps = total_steps
        # per_rank: every rank its own stream of stitches; shared: one stream for all ranks
        seed = config.seed + (self.rank if config.stitch_sync == "per_rank" else 0)
        flops = [c.flops for c in net.costs()] if config.sampler in ("flops_bucketed", "ros") else None
        self.sampler = make_stitch_sampler(config.sampler, len(net.space), seed + 7919, flops, config.num_buckets,
                                           config.ros_gap, config.ros_ramp)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(_param_groups(net, optim), lr=optim.lr, betas=optim.betas)
        warm = warmup_steps if warmup_steps is not None else optim.warmup_steps
        min_ratio = min(optim.min_lr / optim.lr, 1.0)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = min((step - warm) / max(total_steps - warm, 1), 1.0)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        amp = config.amp
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.model: nn.Module = net
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # A route uses only some parameters: without find_unused_parameters DDP would
            # wait forever for the gradients of the others.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(net, device_ids=ids, find_unused_parameters=True)
        self._route_cache: dict[int, torch.Tensor] = {}

    # -- the step
    def backward(self, x: torch.Tensor, y: torch.Tensor, stitch: int | str | Stitch) -> float:
        """Forward + loss + backward on ``stitch``; leaves synchronised, corrected gradients."""
        s = self.net.select(stitch)
        self.optimizer.zero_grad(set_to_none=True)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.model(x)
            loss = self.criterion(out, y)
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(x)
                temp, alpha = self.config.distill_temperature, self.config.distill_alpha
                kd = F.kl_div(F.log_softmax(out.float() / temp, -1), F.log_softmax(t_out.float() / temp, -1),
                              log_target=True, reduction="batchmean") * temp * temp
                loss = (1 - alpha) * loss + alpha * kd
        self.scaler.scale(loss).backward()
        if self.world_size > 1:
            self._correct_grads(s)
        return float(loss.detach())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Stitch]:
        """Sample a stitch and take one optimisation step on it; returns (loss, stitch)."""
        stitch = self.net.space[self.sampler.sample()]
        loss = self.backward(x, y, stitch)
        if self.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, stitch

    def _used(self, s: Stitch) -> torch.Tensor:
        """1.0 for each parameter on the route of ``s``, else 0.0 (cached per stitch)."""
        if s.id not in self._route_cache:
            on_route = {id(p) for m in route_modules(self.net, s) for p in m.parameters()}
            self._route_cache[s.id] = torch.tensor([float(id(p) in on_route) for p in self.params])
        return self._route_cache[s.id]

    def _correct_grads(self, s: Stitch) -> None:
        """Turn DDP's mean over all ranks into the mean over the ranks that used each parameter."""
        if self.config.stitch_sync == "shared":
            return  # every rank ran the same route: DDP's mean is already the right one
        count = self._used(s).to(self.device)
        torch.distributed.all_reduce(count)
        scale = (self.world_size / count.clamp(min=1)).tolist()
        for p, n, k in zip(self.params, count.tolist(), scale):
            if n == 0:
                p.grad = None  # on no rank's route: untouched, like single-process training
            elif p.grad is not None and k != 1.0:
                p.grad.mul_(k)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _param_groups(net: StitchedNet, optim: OptimConfig) -> list[dict[str, Any]]:
    """Stitching layers vs anchors (lr scale) x decay vs no decay (biases, norms, embeddings)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        anchor = not name.startswith("stitch_layers.")
        decay = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
        groups.setdefault((anchor, decay), []).append(p)
    return [{"params": ps, "lr": optim.lr * (optim.anchor_lr_scale if anchor else 1.0),
             "weight_decay": optim.weight_decay if decay else 0.0} for (anchor, decay), ps in groups.items()]


def build_teacher(net: StitchedNet, distill: str | None, pretrained: bool = True) -> nn.Module | None:
    """The distillation teacher: a frozen copy of the largest anchor, or a timm model by name."""
    if distill is None:
        return None
    if distill == "largest":
        return copy.deepcopy(net.anchors[-1]).eval().requires_grad_(False)
    from .anchors import AnchorSpec, create_anchor

    model = create_anchor(AnchorSpec(distill, pretrained, None, (("num_classes", net.num_classes),)))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- DDP helpers


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    # tensors inside all_gather_object do not survive its pickling: send torch.save bytes instead
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


# ---------------------------------------------------------------------------- checks


def check_dataset(net: StitchedNet, dataset: Dataset, batch_size: int) -> int:
    """Fail before training if the data cannot train this network; returns the dataset size."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as e:
        raise DatasetError("the training dataset has no length; snnet needs a map-style dataset") from e
    if n == 0:
        raise DatasetError("the training dataset is empty: point --data/--data-dir at a folder with images")
    try:
        classes = dataset_classes(dataset)
    except DatasetError:
        classes = None  # a plain tensor dataset: nothing to compare
    if classes is not None and classes != net.num_classes:
        raise DatasetError(
            f"the dataset has {classes} classes but the network predicts {net.num_classes}: rebuild the "
            f"network with num_classes={classes} (--num-classes {classes}) or use matching data")
    x = dataset[0][0]
    if tuple(x.shape) != tuple(net.input_size):
        raise DatasetError(
            f"the dataset's images are {tuple(x.shape)} but the network takes {tuple(net.input_size)}; "
            "build the dataset with the anchors' data config (net.anchors[0].data_config)")
    if n < batch_size:
        raise DatasetError(f"the dataset has {n} images, fewer than one batch of {batch_size}: lower --batch-size")
    return n


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


# ---------------------------------------------------------------------------- the loop


def train(net: StitchedNet, train_data: Dataset, config: TrainConfig = TrainConfig(), optim: OptimConfig = OptimConfig(),
          *, teacher: nn.Module | None = None, stop_after: int | None = None) -> TrainResult:
    """Train every network of the space at once on ``train_data`` (items ``(image, label)``).

    Fits the stitching layers by least squares first (unless resuming or ``init_images=0``),
    then runs ``epochs`` epochs (or ``max_steps`` steps), checkpointing every ``ckpt_every``
    steps and at the end, and saves the final network with ``save_pretrained(out_dir/'final')``.
    ``stop_after`` ends the call after that global step with a checkpoint, without changing
    the schedule (a planned interruption; resume with ``resume='auto'``).
    Under ``torch.distributed`` (e.g. torchrun) it trains with DDP; see the module docstring.
    """
    t_start = time.perf_counter()
    rank, world = _dist()
    out_dir = Path(config.out_dir)
    n = check_dataset(net, train_data, config.batch_size)
    resume_path = resolve_resume(config.resume, out_dir)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    stitch_names = [s.name for s in net.space]
    if ckpt is not None:
        _check_resumable(ckpt, stitch_names, config, world, resume_path)

    order = EpochSampler(n, config.seed, rank, world)
    steps_per_epoch = order.shard_size() // config.batch_size
    if steps_per_epoch == 0:
        raise DatasetError(f"each of the {world} processes gets {order.shard_size()} images, fewer than one batch "
                           f"of {config.batch_size}: lower --batch-size")
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = optim.warmup_steps or round(optim.warmup_epochs * steps_per_epoch)

    if teacher is None and config.distill is not None:
        teacher = build_teacher(net, config.distill)
    device = default_device(config.device)
    net.to(device)
    if ckpt is None and config.init_images > 0 and rank == 0:
        # rank 0 fits; DDP broadcasts rank 0's weights when it wraps the network
        calib = DataLoader(train_data, batch_size=min(config.batch_size, config.init_images), shuffle=True,
                           generator=torch.Generator().manual_seed(config.seed), num_workers=config.num_workers)
        net.init_stitching(calib, max_images=config.init_images, progress=config.progress)
    if ckpt is not None:
        net.load_weights(ckpt["model"], source=str(resume_path))

    trainer = Trainer(net, config, optim, total_steps=total, warmup_steps=warmup, teacher=teacher, device=device)
    step, epoch, epoch_step = 0, 0, 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])
        trainer.sampler.load_state_dict(ckpt["sampler"][rank])
        set_rng_state(ckpt["rng"][rank])
        step, epoch, epoch_step = ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps({"train": asdict(config), "optim": asdict(optim),
                                                               "world_size": world}, indent=2))
    log = _Log(out_dir, rank == 0, step, config.tensorboard)

    def checkpoint() -> Path:
        state = {"version": CHECKPOINT_VERSION, "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "trainer": trainer.state_dict(), "sampler": _gather(trainer.sampler.state_dict(), world),
                 "rng": _gather(rng_state(), world), "step": step, "epoch": epoch, "epoch_step": epoch_step,
                 "world_size": world, "config": asdict(config), "optim": asdict(optim), "stitches": stitch_names}
        path = out_dir / CHECKPOINT_NAME
        if rank == 0:
            save_checkpoint(path, state)
        return path

    bar = report_progress(total, "train", "step", config.progress and rank == 0, initial=step)
    last_ckpt: Path | None = resume_path
    history: list[int] = []
    window: list[float] = []
    images, t_loop = 0, time.perf_counter()
    net.train()
    if teacher is not None:
        teacher.eval()
    try:
        while step < total and epoch < config.epochs:
            loader = _epoch_loader(train_data, order, epoch, epoch_step, config)
            for x, y in loader:
                if step >= total:
                    break
                t0 = time.perf_counter()
                try:
                    loss, stitch = trainer.step(x, y)
                except Exception as e:
                    if _is_oom(e):
                        raise TrainingError(
                            f"a batch of {config.batch_size} does not fit in {device} memory ({e}); "
                            f"try --batch-size {max(config.batch_size // 2, 1)}") from e
                    raise
                if not math.isfinite(loss):
                    raise TrainingError(f"the loss became {loss} at step {step + 1} (stitch {stitch.name}); "
                                        "lower --lr or enable gradient clipping. The last checkpoint is kept.")
                step, epoch_step = step + 1, epoch_step + 1
                dt = time.perf_counter() - t0
                images += len(x) * world
                history.append(stitch.id)
                window = (window + [loss])[-config.log_every:]
                lr = trainer.scheduler.get_last_lr()[0]
                log.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "stitch": stitch.id,
                           "stitch_name": stitch.name, "img_per_s": len(x) * world / dt, "time": time.time()})
                bar.update(1)
                if config.progress and (step % config.log_every == 0 or step == total):
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr:.2e}", stitch=stitch.id,
                                    img_s=f"{images / (time.perf_counter() - t_loop):.0f}")
                if stop_after is not None and step >= stop_after:
                    break
                if config.ckpt_every and step % config.ckpt_every == 0 and step < total:
                    last_ckpt = checkpoint()
            else:
                epoch, epoch_step = epoch + 1, 0
                continue
            if epoch_step == steps_per_epoch:  # stopped exactly at an epoch's end
                epoch, epoch_step = epoch + 1, 0
            break
    finally:
        bar.close()
        log.close()
    last_ckpt = checkpoint()
    finished = step >= total
    final_dir = None
    if finished and rank == 0:
        final_dir = net.save_pretrained(out_dir / "final")
    seconds = time.perf_counter() - t_start
    return TrainResult(step, total, finished, sum(window) / len(window) if window else float("nan"), seconds,
                       images / max(time.perf_counter() - t_loop, 1e-9), out_dir, last_ckpt, final_dir, tuple(history))


def _epoch_loader(data: Dataset, order: EpochSampler, epoch: int, start_batch: int, config: TrainConfig) -> DataLoader:
    """This epoch's batches from ``start_batch`` on (data augmentation re-drawn for the epoch)."""
    from .data import set_epoch

    loader = DataLoader(data, batch_size=config.batch_size, sampler=order, drop_last=True,
                        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        # own generator: creating an iterator must not touch the global RNG
                        generator=torch.Generator().manual_seed(config.seed * 7 + epoch))
    set_epoch(loader, epoch)
    order.start = start_batch * config.batch_size
    return loader


def _check_resumable(ckpt: dict[str, Any], stitch_names: list[str], config: TrainConfig, world: int, path: Path | None) -> None:
    if ckpt["stitches"] != stitch_names:
        theirs, ours = ckpt["stitches"], stitch_names
        raise CheckpointError(
            f"checkpoint {path} was made for another stitch space ({len(theirs)} stitches, e.g. {theirs[:2]}) than this "
            f"network's ({len(ours)} stitches, e.g. {ours[:2]}); resume with the same anchors and space options")
    default = TrainConfig()  # a field newer than the checkpoint had its default then
    saved = {k: ckpt["config"].get(k, getattr(default, k)) for k in _RESUME_FIXED}
    changed = [f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in _RESUME_FIXED if saved[k] != getattr(config, k)]
    if changed:
        raise CheckpointError(f"cannot resume {path} with different settings ({'; '.join(changed)}): they decide which "
                              "batches and stitches come next. Use the original values or start a new --out")
    if ckpt.get("world_size", 1) != world:
        raise CheckpointError(f"checkpoint {path} was written by {ckpt.get('world_size')} processes; resume it with "
                              f"the same number (now {world}) so every rank gets its own data shard and sampler back")


class _Log:
    """metrics.jsonl (one JSON object per step) and TensorBoard scalars, on rank 0 only.

    On resume the lines of steps after the checkpoint (written by the interrupted run, and
    about to be redone) are dropped, so the file always describes one run.
    """

    def __init__(self, out_dir: Path, active: bool, start_step: int, tensorboard: bool) -> None:
        self.file = self.writer = None
        if not active:
            return
        path = out_dir / METRICS_NAME
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _line_step(ln) <= start_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k in ("loss", "lr", "img_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: drop it
