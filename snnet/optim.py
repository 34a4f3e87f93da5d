"""The optimizer and learning-rate schedule of SN-Net training.

Parameters fall into four groups: stitching layers or anchors (the anchors' rate is
``anchor_lr_scale`` times the stitching layers', as the reference Swin code's 0.1) × with or
without weight decay (biases, norms, position embeddings and class tokens get none).

The schedule is timm's ``CosineLRScheduler`` formula, evaluated at every optimizer step:
a linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup`` steps, then a cosine decay to
``min_lr``. ``warmup_prefix=True`` starts the cosine after the warm-up (the reference Swin
code); ``False`` spans it over the whole run with the warm-up overriding its start (timm's
default, used by the reference DeiT, LeViT and ResNet scripts). ``schedule_unit='epoch'``
holds the rate for a whole epoch at its value at the epoch's start, as those per-epoch
scripts do. ``warmup_lr=None`` is snnet's own ramp, ``lr * (k + 1) / (warmup + 1)``.

The rates themselves come from :meth:`snnet.config.TrainConfig.rates` (the linear scaling rule
applied); the settings from :class:`~snnet.config.OptimConfig` and :class:`~snnet.config.ScheduleConfig`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import OPTIMIZERS, SCHEDULE_UNITS, OptimConfig, Rates, ScheduleConfig

__all__ = ["OPTIMIZERS", "SCHEDULE_UNITS", "build_optimizer", "lr_factor", "param_groups"]
# timm models' own no_weight_decay() lists for the kinds snnet stitches
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(net: nn.Module, optim: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """Stitching layers vs anchors (lr scale) x decay vs no decay (biases, norms, embeddings), at peak rate ``lr``.

    A plain model (no stitching layers) is all anchor: its rate is ``lr * anchor_lr_scale``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        anchor = not name.startswith("stitch_layers.")
        decay = p.ndim > 1 and not name.endswith(_NO_DECAY_NAMES)
        groups.setdefault((anchor, decay), []).append(p)
    return [{"params": ps, "lr": lr * (optim.anchor_lr_scale if anchor else 1.0),
             "weight_decay": optim.weight_decay if decay else 0.0, "anchor": anchor}
            for (anchor, decay), ps in groups.items()]


def build_optimizer(net: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), SGD with (Nesterov) momentum or LAMB, at peak rate ``lr``."""
    groups = param_groups(net, optim, lr)
    if optim.optimizer == "sgd":
        # timm's 'sgd' (the reference ResNet script) is Nesterov momentum with L2 weight decay
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov)
    if optim.optimizer == "lamb":
        from timm.optim import Lamb

        # SN-Netv2's 'fusedlamb' (apex's FusedLAMB): Adam moments, a per-tensor trust ratio, and the gradients'
        # global norm clipped to 1 inside the step, as timm's Lamb does by default
        return Lamb(groups, lr=lr, betas=optim.betas, eps=optim.eps)
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, eps=optim.eps)


def lr_factor(step: int, schedule: ScheduleConfig, rates: Rates, total_steps: int, warmup_steps: int,
              steps_per_epoch: int | None = None) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a multiple of the peak rate ``rates.lr``."""
    t = step
    if schedule.unit == "epoch" and steps_per_epoch:
        t = step // steps_per_epoch * steps_per_epoch
    if t < warmup_steps:
        if rates.warmup_lr is None:
            return (t + 1) / (warmup_steps + 1)
        return (rates.warmup_lr + t * (rates.lr - rates.warmup_lr) / warmup_steps) / rates.lr
    if schedule.warmup_prefix:
        progress = (t - warmup_steps) / max(total_steps - warmup_steps, 1)
    else:
        progress = t / max(total_steps, 1)
    min_ratio = min(rates.min_lr / rates.lr, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
