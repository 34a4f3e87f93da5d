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
so a parameter on the route of k of the N ranks gets the sum of those k gradients divided by N:
exactly the gradient one process would compute on the global batch, each rank's share through
its own stitch (the mean loss over the N (stitch, batch) pairs). That is the default
(``ddp_grads='mean'``, what the reference code does); with the linear scaling rule, SGD then moves
every parameter, to first order, as N single-process steps on the same images would. A parameter on no
rank's route gets no gradient at all (DDP leaves it None; snnet makes sure), so AdamW leaves it
and its moments untouched, as in single-process training.

``ddp_grads='users'`` rescales each gradient by N/k to the mean over the ranks that used it.
That is not a fix for "slow" stitching layers: AdamW's update does not change when a gradient
is multiplied by a constant, and where k varies from step to step the rescale re-weights steps
and distorts the balance between often- and rarely-used parameters; with SGD (and its L2 weight
decay) it makes a parameter used by one of N ranks step N times further than one process would
on the same images. ``benchmarks/bench_ddp_grads.py`` measures both against single-process runs.
``stitch_sync='shared'`` instead makes all ranks use one stitch per step (same sampler seed
everywhere), at the price of fewer stitches visited per step.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import DatasetError, num_classes as dataset_classes
from .errors import CheckpointError, ConfigError, RunFolderError, SnnetError, TrainingError, TrainingInterrupted
from .report import progress as report_progress
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, load_checkpoint, resolve_resume, rng_state,
                         save_checkpoint, seed_everything, set_rng_state)
from .distill import DISTILL_TYPES, build_teacher, check_teacher, distill_loss, teacher_logits
from .io import atomic_write, remove_stale_temps
from .model import WEIGHTS_NAME, StitchedNet
from .optim import OPTIMIZERS, SCHEDULE_UNITS, build_optimizer, lr_factor
from .runlock import (FINAL_NAME, METRICS_NAME, RUN_ENTRIES, TRAIN_CONFIG_NAME, RunLock, StopSignals,
                      claim_run_folder)
from .sampling import ROS_GAP, SAMPLERS, EpochSampler, SeededItems, make_stitch_sampler, seed_worker
from .space import Stitch

STITCH_SYNC = ("per_rank", "shared")
AMP_MODES = ("auto", "off", "fp16", "bf16")
MIXUP_MODES = ("batch", "pair", "elem")
DDP_GRADS = ("mean", "users")
CLIP_MODES = ("norm", "value", "agc")
# Config fields that must not change when a run is resumed: they decide which batches and
# stitches come next, so changing them would silently make a different run.
_RESUME_FIXED = ("batch_size", "seed", "sampler", "num_buckets", "ros_gap", "ros_ramp", "stitch_sync", "repeated_aug")


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class OptimConfig:
    """AdamW or SGD, linear warm-up then cosine decay (the DeiT/SN-Net recipe; see snnet.optim).

    ``lr`` is the rate the stitching layers get (as used: the linear scaling rule is applied by
    :mod:`snnet.recipes` and the CLI). ``anchor_lr_scale`` multiplies the learning rate of
    the anchors' own parameters: the stitching layers start from a least-squares fit and need
    to move, the pretrained anchors less so (1.0 = one learning rate, as the DeiT reference;
    0.1 in the reference Swin code). ``warmup_lr`` is the rate at the first step of the
    warm-up (None: snnet's ramp ``lr * (k + 1) / (warmup + 1)``); ``warmup_prefix`` starts the
    cosine after the warm-up instead of spanning the whole run; ``schedule_unit='epoch'``
    changes the rate once an epoch, as the reference's per-epoch schedulers. ``momentum`` and
    ``nesterov`` are SGD's; ``clip_mode`` is timm's (``norm``, ``value`` or ``agc``).
    """

    lr: float = 5e-5
    anchor_lr_scale: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    min_lr: float = 1e-6
    clip_grad: float | None = 5.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    nesterov: bool = True
    eps: float = 1e-8
    warmup_lr: float | None = None
    warmup_prefix: bool = True
    schedule_unit: str = "step"
    clip_mode: str = "norm"

    def __post_init__(self) -> None:
        # isfinite: NaN passes every `x < 0` test, and an infinite rate only shows up as a NaN loss later
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0 and finite, got {self.lr}")
        bad = {k: v for k, v in (("anchor_lr_scale", self.anchor_lr_scale), ("weight_decay", self.weight_decay),
                                 ("min_lr", self.min_lr), ("momentum", self.momentum), ("eps", self.eps),
                                 ("warmup_epochs", self.warmup_epochs), ("warmup_lr", self.warmup_lr or 0.0))
               if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ConfigError(f"{', '.join(bad)} must be >= 0 and finite, got {', '.join(f'{k}={v}' for k, v in bad.items())}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ConfigError(f"clip_grad must be > 0 and finite, or None, got {self.clip_grad}")
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule_unit", self.schedule_unit, SCHEDULE_UNITS),
                                     ("clip_mode", self.clip_mode, CLIP_MODES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; use one of {allowed}")


@dataclass(frozen=True)
class TrainConfig:
    """What to train for, how to sample stitches, and where to write.

    ``batch_size`` is per process (the global batch is ``batch_size * world_size``).
    ``max_steps`` caps the run below ``epochs`` (the schedule spans the capped length).
    ``amp``: ``'auto'`` = float16 autocast + GradScaler on CUDA, off on CPU; ``'bf16'``
    autocasts to bfloat16 on any device; ``'off'``.
    ``distill``: None, ``'largest'`` (a frozen copy of the largest anchor, taken at the start)
    or a timm model name (built pretrained with its own head, whose classes must be the
    network's); ``distill_type``: ``'soft'`` (KL at ``distill_temperature``) or ``'hard'``
    (cross-entropy on the teacher's top class, DeiT's); weight ``distill_alpha``.
    ``mixup``/``cutmix``: the alphas of timm's Mixup (0: off); with either on, the loss is
    timm's SoftTargetCrossEntropy on mixed, label-smoothed targets.
    ``repeated_aug``: copies of each image per epoch, consecutive copies on different ranks
    (DeiT's repeated augmentation; 1 = off). The epoch keeps its length in images.
    ``ddp_grads``: under several processes with ``stitch_sync='per_rank'``, ``'mean'`` keeps
    DDP's mean over all ranks, ``'users'`` rescales each gradient to the mean over the ranks
    whose route used it (see the module docstring).
    ``ckpt_every``: steps between checkpoints (0 = only at the end).
    ``resume``: a checkpoint path, ``'auto'`` (``out_dir/checkpoint.pt`` if it exists) or None.
    ``overwrite``: delete a run already in ``out_dir`` and start afresh (without it, and without
    ``resume``, a folder holding a run is refused: see :mod:`snnet.runlock`).
    ``seed`` decides the data order, the stitches, each image's augmentation and, at the start of
    a fresh run, the global torch/numpy/random generators (rank r: ``seed + r``).
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
    distill_type: str = "soft"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    repeated_aug: int = 1
    ddp_grads: str = "mean"
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
    overwrite: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

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
        need(self.num_workers >= 0, f"the number of data loader workers must be >= 0, got {self.num_workers}")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        need(not (self.overwrite and self.resume is not None),
             "--overwrite deletes the run that --resume would continue: give one of them")
        need(self.distill_type in DISTILL_TYPES, f"unknown distill_type {self.distill_type!r}; use one of {DISTILL_TYPES}")
        need(math.isfinite(self.mixup) and math.isfinite(self.cutmix) and self.mixup >= 0 and self.cutmix >= 0,
             f"mixup and cutmix must be >= 0 and finite, got {self.mixup}, {self.cutmix}")
        need(0.0 <= self.mixup_prob <= 1.0 and 0.0 <= self.mixup_switch_prob <= 1.0,
             f"mixup_prob and mixup_switch_prob must be in [0, 1], got {self.mixup_prob}, {self.mixup_switch_prob}")
        need(self.mixup_mode in MIXUP_MODES, f"unknown mixup_mode {self.mixup_mode!r}; use one of {MIXUP_MODES}")
        need(not self.mixing or self.batch_size % 2 == 0,
             f"mixup/cutmix need an even batch size (timm's Mixup pairs images), got {self.batch_size}")
        need(self.repeated_aug >= 1, f"repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}")
        need(self.ddp_grads in DDP_GRADS, f"unknown ddp_grads {self.ddp_grads!r}; use one of {DDP_GRADS}")
        default_device(self.device)  # an unknown or absent device fails now, not after the set-up

    @property
    def mixing(self) -> bool:
        """Whether mixup or CutMix is on."""
        return self.mixup > 0 or self.cutmix > 0


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
    """``name``, else CUDA if there is one, else CPU; a bare 'cuda' becomes this process's GPU (LOCAL_RANK).

    A name torch does not know, or a device this machine does not have, raises :class:`ConfigError`.
    """
    try:
        device = torch.device(name) if name is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: snnet runs on cpu, cuda or mps")
    return device


class Trainer:
    """One optimisation step at a time: stitch sampling, mixup, AMP, distillation, DDP, the optimizer.

    :func:`train` drives it over a dataset with checkpoints and logs; use it directly for a
    custom loop. ``total_steps`` sizes the LR schedule; ``steps_per_epoch`` is needed by the
    per-epoch schedule (``OptimConfig.schedule_unit='epoch'``).
    """

    def __init__(self, net: StitchedNet, config: TrainConfig = TrainConfig(), optim: OptimConfig = OptimConfig(), *,
                 total_steps: int, warmup_steps: int | None = None, teacher: nn.Module | None = None,
                 device: str | torch.device | None = None, steps_per_epoch: int | None = None) -> None:
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
        self.optimizer = build_optimizer(net, optim)
        warm = warmup_steps if warmup_steps is not None else optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, optim, total_steps, warm, steps_per_epoch))
        amp = config.amp
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixup = None
        if config.mixing:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            # timm's Mixup smooths the labels itself and yields soft targets
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                               switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                               label_smoothing=config.label_smoothing, num_classes=net.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
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
    def loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of logits ``out`` on (possibly mixed) images ``x`` with targets ``y``."""
        loss = self.criterion(out, y)
        if self.teacher is not None:
            kd = distill_loss(out.float(), teacher_logits(self.teacher, x).float(), self.config.distill_type,
                              self.config.distill_temperature)
            loss = (1 - self.config.distill_alpha) * loss + self.config.distill_alpha * kd
        return loss

    def backward(self, x: torch.Tensor, y: torch.Tensor, stitch: int | str | Stitch) -> float:
        """Forward + loss + backward on ``stitch``; leaves synchronised, corrected gradients."""
        s = self.net.select(stitch)
        self.optimizer.zero_grad(set_to_none=True)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.loss(self.model(x), x, y)
        self.scaler.scale(loss).backward()
        if self.world_size > 1:
            self._sync_grads(s)
        return float(loss.detach())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Stitch]:
        """Sample a stitch and take one optimisation step on it; returns (loss, stitch)."""
        stitch = self.net.space[self.sampler.sample()]
        loss = self.backward(x, y, stitch)
        if self.optim.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad([p for p in self.params if p.grad is not None], self.optim.clip_grad,
                               mode=self.optim.clip_mode)
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

    def _sync_grads(self, s: Stitch) -> None:
        """After DDP's all-reduce: parameters no rank used get no gradient (as in one process);
        with ``ddp_grads='users'`` the others get the mean over the ranks that used them."""
        if self.config.stitch_sync == "shared":
            return  # every rank ran the same route: DDP's mean is already the right one
        # a copy: all_reduce works in place, and on CPU .to() would hand back the cached tensor
        # itself, so every later step on this stitch would sum ever larger counts
        count = self._used(s).to(self.device, copy=True)
        torch.distributed.all_reduce(count)
        rescale = self.config.ddp_grads == "users"
        scale = (self.world_size / count.clamp(min=1)).tolist()
        for p, n, k in zip(self.params, count.tolist(), scale):
            if n == 0:
                p.grad = None  # on no rank's route: untouched, like single-process training
            elif rescale and p.grad is not None and k != 1.0:
                p.grad.mul_(k)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------- DDP helpers


def _stop_requested(stops: StopSignals, world_size: int, device: torch.device) -> bool:
    """Whether any rank got Ctrl-C/SIGTERM; every rank asks after every step, so all stop at the same one."""
    if world_size == 1:
        return stops.received is not None
    flag = torch.tensor([float(stops.received is not None)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    anyone = bool(flag.item())
    if anyone and stops.received is None:
        stops.received = "a signal to another process"
    return anyone


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
    the schedule (a planned interruption; resume with ``resume='auto'``). Ctrl-C (SIGINT) or
    SIGTERM does the same after the step in progress, then raises :class:`TrainingInterrupted`.
    Under ``torch.distributed`` (e.g. torchrun) it trains with DDP; see the module docstring.

    The run holds a lock on ``out_dir`` while it lasts; a folder holding another run, live or
    not, is refused unless resumed or overwritten (:mod:`snnet.runlock`).
    """
    n = check_dataset(net, train_data, config.batch_size)  # before the folder is touched
    if teacher is not None:
        check_teacher(teacher, net)  # a teacher that cannot teach must not cost a run, nor touch its folder
    lock = _claim_run_folder(config)
    try:
        return _train(net, train_data, n, config, optim, teacher, stop_after)
    except BaseException:
        if lock is not None:  # no writer is left: nothing a failed write left behind can be in use
            remove_stale_temps(config.out_dir, RUN_ENTRIES)
        raise
    finally:
        if lock is not None:
            lock.release()


def _claim_run_folder(config: TrainConfig) -> RunLock | None:
    """Rank 0 locks and readies ``out_dir``; every rank gets its verdict, so a refusal stops all of them."""
    rank, world = _dist()
    lock, problem = None, None
    if rank == 0:
        try:
            lock = claim_run_folder(config.out_dir, config.resume, config.overwrite)
        except SnnetError as e:
            problem = e
    if world > 1:
        verdict = _gather(str(problem) if problem is not None else None, world)[0]
        if verdict is not None and problem is None:
            problem = RunFolderError(verdict)
    if problem is not None:
        raise problem
    return lock


def _train(net: StitchedNet, train_data: Dataset, n: int, config: TrainConfig, optim: OptimConfig,
           teacher: nn.Module | None, stop_after: int | None) -> TrainResult:
    t_start = time.perf_counter()
    rank, world = _dist()
    out_dir = Path(config.out_dir)
    resume_path = resolve_resume(config.resume, out_dir)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    stitch_names = [s.name for s in net.space]
    if ckpt is not None:
        _check_resumable(ckpt, stitch_names, config, world, resume_path)
    else:  # a fresh run: everything drawn outside snnet's own generators (dropout, ...) follows the seed
        seed_everything(config.seed + rank)
    train_data = SeededItems.wrap(train_data, config.seed)

    order = EpochSampler(n, config.seed, rank, world, repeats=config.repeated_aug)
    steps_per_epoch = order.shard_size() // config.batch_size
    if steps_per_epoch == 0:
        raise DatasetError(f"each of the {world} processes gets {order.shard_size()} images, fewer than one batch "
                           f"of {config.batch_size}: lower --batch-size")
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = optim.warmup_steps or round(optim.warmup_epochs * steps_per_epoch)
    if ckpt is not None and ckpt["step"] >= total:  # a finished run: nothing to train, nothing rewritten
        final = out_dir / FINAL_NAME
        if rank == 0 and not (final / WEIGHTS_NAME).is_file():  # only if someone deleted it
            net.load_weights(ckpt["model"], source=str(resume_path))
            net.save_pretrained(final)
        return TrainResult(ckpt["step"], total, True, float("nan"), 0.0, 0.0, out_dir, resume_path, final)

    # a named teacher is built (and checked) before any work: a wrong one must not cost a run
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

    trainer = Trainer(net, config, optim, total_steps=total, warmup_steps=warmup, teacher=teacher, device=device,
                      steps_per_epoch=steps_per_epoch)
    step, epoch, epoch_step = 0, 0, 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])
        trainer.sampler.load_state_dict(ckpt["sampler"][rank])
        set_rng_state(ckpt["rng"][rank])
        step, epoch, epoch_step = ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"train": asdict(config), "optim": asdict(optim), "world_size": world}, indent=2)
        # atomically, like every other file of a run: an interrupted write never leaves half a config
        atomic_write(out_dir / TRAIN_CONFIG_NAME, lambda tmp: tmp.write_text(text), durable=False)
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
    stops = StopSignals().start()  # Ctrl-C: finish the step, checkpoint, then stop
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
                    clip = "" if optim.clip_grad is not None else " or enable gradient clipping"
                    raise TrainingError(f"the loss became {loss} at step {step + 1} (stitch {stitch.name}); "
                                        f"lower --lr{clip}. The last checkpoint is kept.")
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
                if (stop_after is not None and step >= stop_after) or _stop_requested(stops, world, device):
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
        stops.stop()
        bar.close()
        log.close()
    last_ckpt = checkpoint()
    if stops.received is not None and step < total:
        raise TrainingInterrupted(step, total, last_ckpt, stops.received)
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
                        generator=torch.Generator().manual_seed(config.seed * 7 + epoch),
                        worker_init_fn=seed_worker(config.seed, epoch) if config.num_workers else None)
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
