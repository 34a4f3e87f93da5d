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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .train import OptimConfig

__all__ = ["OPTIMIZERS", "SCHEDULE_UNITS", "build_optimizer", "lr_factor", "param_groups", "scaled_lr"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULE_UNITS = ("step", "epoch")
# timm models' own no_weight_decay() lists for the kinds snnet stitches
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def scaled_lr(base: float, global_batch: int, base_batch: int = 512) -> float:
    """The linear scaling rule of the reference code: ``base`` is the rate at ``base_batch``."""
    return base * global_batch / base_batch


def param_groups(net: nn.Module, optim: "OptimConfig") -> list[dict[str, Any]]:
    """Stitching layers vs anchors (lr scale) x decay vs no decay (biases, norms, embeddings)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        anchor = not name.startswith("stitch_layers.")
        decay = p.ndim > 1 and not name.endswith(_NO_DECAY_NAMES)
        groups.setdefault((anchor, decay), []).append(p)
    return [{"params": ps, "lr": optim.lr * (optim.anchor_lr_scale if anchor else 1.0),
             "weight_decay": optim.weight_decay if decay else 0.0, "anchor": anchor}
            for (anchor, decay), ps in groups.items()]


def build_optimizer(net: nn.Module, optim: "OptimConfig") -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with (Nesterov) momentum, as the recipe says."""
    groups = param_groups(net, optim)
    if optim.optimizer == "sgd":
        # timm's 'sgd' (the reference ResNet script) is Nesterov momentum with L2 weight decay
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def lr_factor(step: int, optim: "OptimConfig", total_steps: int, warmup_steps: int,
              steps_per_epoch: int | None = None) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a multiple of ``optim.lr``."""
    t = step
    if optim.schedule_unit == "epoch" and steps_per_epoch:
        t = step // steps_per_epoch * steps_per_epoch
    if t < warmup_steps:
        if optim.warmup_lr is None:
            return (t + 1) / (warmup_steps + 1)
        return (optim.warmup_lr + t * (optim.lr - optim.warmup_lr) / warmup_steps) / optim.lr
    if optim.warmup_prefix:
        progress = (t - warmup_steps) / max(total_steps - warmup_steps, 1)
    else:
        progress = t / max(total_steps, 1)
    min_ratio = min(optim.min_lr / optim.lr, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
