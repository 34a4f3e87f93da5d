"""The paper's training recipes as named presets, every value with where it comes from.

Each :class:`Recipe` holds every hyper-parameter of one family's SN-Net training as the
authors' released code runs it (ziplab/SN-Net at commit c2dcf30: the ``stitching_*`` folders'
scripts, configs and argument defaults; the paper trains on 8 GPUs with 128 images each).
``snnet train --recipe deit`` uses one, ``--print-recipe`` shows it resolved, and any field can
be overridden (``--set field=value``, or the dedicated options).

The learning rates follow the reference's linear scaling rule: ``lr`` is the rate at a global
batch of ``lr_base_batch`` (512), the rate used is ``lr * batch_size * processes / 512``
(5e-5 becomes 1e-4 on 8 x 128). The Swin code scales its warm-up and minimum rates the same
way (``scale_lr_bounds``); the DeiT and LeViT code scale only the peak rate.

    from snnet.recipes import get_recipe
    recipe = get_recipe("deit").override(epochs=30)
    train_config, optim_config = recipe.configs(world_size=8, out_dir="runs/deit")
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SnnetError
from .optim import scaled_lr

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "RecipeError", "get_recipe"]

_REF = "ziplab/SN-Net@c2dcf30"
_RE_MODES = ("const", "rand", "pixel")
# timm's create_transform defaults: only values that differ from them are passed on
_TIMM_COLOR_JITTER = 0.4


class RecipeError(SnnetError, ValueError):
    """A recipe name, field or value that does not exist or does not fit."""


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of an SN-Net training run (see the module docstring).

    Learning rates (``lr``, and ``warmup_lr``/``min_lr`` when ``scale_lr_bounds``) are given at
    a global batch of ``lr_base_batch`` and scaled linearly to the run's. ``batch_size`` is per
    process. ``drop_path`` is passed to the anchors when they are built (timm's
    ``drop_path_rate``). ``auto_augment``, ``color_jitter``, ``train_interpolation`` and
    ``re_*`` configure timm's training transform; ``mixup``/``cutmix`` timm's Mixup;
    ``repeated_aug`` the copies of each image per epoch. ``distill`` is ``'largest'``, a timm
    model name or None; ``notes`` say what of the reference snnet does not reproduce.
    """

    name: str
    source: str
    anchors: str
    epochs: int
    batch_size: int
    lr: float
    lr_base_batch: int = 512
    scale_lr_bounds: bool = False
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float | None = None
    warmup_prefix: bool = True
    schedule_unit: str = "step"
    min_lr: float = 1e-6
    anchor_lr_scale: float = 1.0
    clip_grad: float | None = None
    clip_mode: str = "norm"
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    augment: bool = True
    auto_augment: str | None = None
    color_jitter: float = _TIMM_COLOR_JITTER
    train_interpolation: str | None = None  # None: the anchors' own
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    repeated_aug: int = 1
    drop_path: float = 0.0
    distill: str | None = None
    distill_type: str = "soft"
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    init_images: int = 100
    amp: str = "auto"
    sampler: str = "uniform"
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RecipeError(f"recipe {self.name!r}: {msg}")

        need(self.lr_base_batch >= 1, f"lr_base_batch must be >= 1, got {self.lr_base_batch}")
        need(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(0.0 <= self.re_prob <= 1.0, f"re_prob must be in [0, 1], got {self.re_prob}")
        need(self.re_mode in _RE_MODES, f"unknown re_mode {self.re_mode!r}; use one of {_RE_MODES}")
        need(self.re_count >= 1, f"re_count must be >= 1, got {self.re_count}")
        need(self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}")

    # -- overriding
    def override(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (field names as in the class), checked like the original."""
        unknown = sorted(set(changes) - set(_FIELDS))
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {', '.join(unknown)}; fields: {', '.join(_FIELDS)}")
        return dataclasses.replace(self, **changes)

    def override_text(self, assignments: list[str]) -> "Recipe":
        """A copy with ``key=value`` assignments (the CLI's ``--set``), values parsed by field type."""
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise RecipeError(f"--set takes FIELD=VALUE, got {item!r}")
            if key not in _FIELDS or key in ("name", "source", "notes"):
                raise RecipeError(f"unknown recipe field {key!r}; fields: {', '.join(f for f in _FIELDS if f not in ('name', 'source', 'notes'))}")
            changes[key] = _parse(key, _FIELDS[key], text.strip())
        return self.override(**changes)

    # -- resolving
    def lr_scale(self, global_batch: int) -> float:
        """The factor the linear scaling rule applies at ``global_batch``."""
        return scaled_lr(1.0, global_batch, self.lr_base_batch)

    def configs(self, *, world_size: int = 1, **run: Any) -> tuple[Any, Any]:
        """The :class:`~snnet.train.TrainConfig` and :class:`~snnet.train.OptimConfig` of this recipe
        on ``world_size`` processes; ``run`` adds run options (``out_dir``, ``max_steps``, ...)."""
        from .train import OptimConfig, TrainConfig

        if world_size < 1:
            raise RecipeError(f"world_size must be >= 1, got {world_size}")
        scale = self.lr_scale(self.batch_size * world_size)
        bound = scale if self.scale_lr_bounds else 1.0
        def shared(config: type) -> dict[str, Any]:  # the fields a config has under the recipe's names
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(config) if f.name in _FIELDS}

        train = TrainConfig(**{**shared(TrainConfig), **run})
        optim = OptimConfig(**{**shared(OptimConfig), "lr": self.lr * scale, "min_lr": self.min_lr * bound,
                               "warmup_lr": None if self.warmup_lr is None else self.warmup_lr * bound,
                               "betas": tuple(self.betas)})
        return train, optim

    def transform_options(self) -> dict[str, Any]:
        """Arguments for timm's training transform that differ from its defaults."""
        options: dict[str, Any] = {}
        if self.auto_augment:
            options["auto_augment"] = self.auto_augment
        if self.re_prob > 0:
            options.update(re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count)
        if self.color_jitter != _TIMM_COLOR_JITTER:
            options["color_jitter"] = self.color_jitter
        if self.train_interpolation:
            options["interpolation"] = self.train_interpolation
        return options

    def anchor_kwargs(self) -> tuple[tuple[str, Any], ...]:
        """Keyword arguments for building the anchors (timm's drop-path rate)."""
        return (("drop_path_rate", self.drop_path),) if self.drop_path > 0 else ()

    def describe(self, world_size: int = 1) -> str:
        """Every field, resolved, and the learning rates the run will use (``--print-recipe``)."""
        _, optim = self.configs(world_size=world_size)
        width = max(len(f) for f in _FIELDS)
        lines = [f"recipe {self.name}: {self.source}", ""]
        lines += [f"  {k:<{width}} = {_show(getattr(self, k))}" for k in _FIELDS if k not in ("name", "source", "notes")]
        from .adapters import family

        members = family(self.anchors)
        if members:  # a family name: show the pinned weights it stands for
            lines[2] += f" ({', '.join(members)})"
        lines += ["", self.rates(world_size, optim)]
        lines += [f"  not reproduced: {n}" for n in self.notes]
        return "\n".join(lines)

    def rates(self, world_size: int, optim: Any | None = None) -> str:
        """The linear scaling rule at this run's size, in one line."""
        if optim is None:
            _, optim = self.configs(world_size=world_size)
        batch = self.batch_size * world_size
        text = (f"learning rate: base {self.lr:g} at batch {self.lr_base_batch} -> {optim.lr:.4g} at global batch "
                f"{batch} ({self.batch_size} x {world_size} process{'es' if world_size > 1 else ''})")
        if self.anchor_lr_scale != 1.0:
            text += f"; anchors {optim.lr * self.anchor_lr_scale:.4g}"
        if optim.warmup_lr is not None:
            text += f"; warm-up from {optim.warmup_lr:.4g}"
        return text + f"; down to {optim.min_lr:.4g}"


_FIELDS: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(Recipe)}


def _show(value: Any) -> str:
    return "none" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _parse(key: str, kind: str, text: str) -> Any:
    """A ``--set`` value by the field's annotation: ``none``, booleans, numbers, tuples, strings."""
    low = text.lower()
    if "None" in kind and low in ("none", "null", ""):
        return None
    try:
        if kind.startswith("bool"):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind.startswith("tuple[float"):
            return tuple(float(v) for v in text.strip("()").split(","))
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        raise RecipeError(f"--set {key}={text}: expected {kind.replace(' | None', ' or none')}") from None
    return text


# ---------------------------------------------------------------------------- the presets

# snnet's own defaults (no --recipe): the learning rate is 5e-5 at the default batch of 64.
DEFAULT_RECIPE = Recipe(
    name="snnet", source="snnet's defaults (no --recipe): not a paper recipe", anchors="fmnist", epochs=1,
    batch_size=64, lr=4e-4, clip_grad=5.0)

_DEIT_NOTES = (
    "the reference steps its scheduler after each epoch with that epoch's index, so epoch e runs at the rate of e-1 "
    "(epochs 0 and 1 both at warmup_lr); snnet runs epoch e at the rate of e",
)
_RESNET_NOTES = (
    "--split-bn (batch norm statistics split between the two halves of every batch) and --dist-bn reduce "
    "(averaging BN statistics over processes after each epoch) are not reproduced",
    "--resplit has no effect in the reference without --aug-splits and is left out",
    "the reference sets lr 0.05 as such, unscaled; here 0.025 at batch 512 gives the same 0.05 on its 8 x 128",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="deit",
        source=(f"{_REF} stitching_deit: config/deit_stitching.json (anchors, epochs, batch, lr, warmup/min lr, "
                "hard distillation from regnety_160), params.py defaults (AdamW, weight decay, 5 warm-up epochs, "
                "drop-path 0.1, RandAugment, random erasing, mixup/CutMix, repeated augmentation, label smoothing), "
                "main.py (linear scaling by batch x GPUs / 512, per-epoch cosine), losses.py, samplers.py"),
        anchors="deit", epochs=50, batch_size=128, lr=5e-5, optimizer="adamw", weight_decay=0.05,
        warmup_epochs=5, warmup_lr=1e-7, warmup_prefix=False, schedule_unit="epoch", min_lr=1e-6,
        clip_grad=None, label_smoothing=0.1, mixup=0.8, cutmix=1.0, auto_augment="rand-m9-mstd0.5-inc1",
        train_interpolation="bicubic", re_prob=0.25, re_mode="pixel", repeated_aug=3, drop_path=0.1,
        distill="regnety_160.deit_in1k", distill_type="hard", distill_alpha=0.5, init_images=100,
        notes=_DEIT_NOTES),
    Recipe(
        name="swin",
        source=(f"{_REF} stitching_swin: configs/snnet/stitch_swin_ti_s_b.yaml (ImageNet-22k->1k anchors, 50 epochs, "
                "5 warm-up, drop-path 0.2, anchors at 0.1x), config.py defaults (base lr 5e-4, warmup 5e-7, min 5e-6, "
                "AdamW, clip 5, augmentation), main.py (all three rates scaled by batch x GPUs / 512), "
                "lr_scheduler.py (per-step cosine after the warm-up), losses.py (hard distillation)"),
        anchors=("swin_tiny_patch4_window7_224.ms_in22k_ft_in1k,swin_small_patch4_window7_224.ms_in22k_ft_in1k,"
                 "swin_base_patch4_window7_224.ms_in22k_ft_in1k"),
        epochs=50, batch_size=128, lr=5e-4, scale_lr_bounds=True, optimizer="adamw", weight_decay=0.05,
        warmup_epochs=5, warmup_lr=5e-7, warmup_prefix=True, schedule_unit="step", min_lr=5e-6,
        anchor_lr_scale=0.1, clip_grad=5.0, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
        auto_augment="rand-m9-mstd0.5-inc1", train_interpolation="bicubic", re_prob=0.25, re_mode="pixel",
        drop_path=0.2, distill="regnety_160.deit_in1k", distill_type="hard", distill_alpha=0.5, init_images=100,
        notes=("the reference puts stitching-layer biases in a weight-decayed group; snnet decays no bias",)),
    Recipe(
        name="resnet",
        source=(f"{_REF} stitching_resnet_swin: README.md training command (-b 128 x 8 GPUs, cosine, 30 epochs, lr 0.05, "
                "--amp, RandAugment, random erasing 0.6), train.py defaults (SGD Nesterov momentum 0.9, weight decay "
                "2e-5, 5 warm-up epochs from 1e-5, min lr 0, label smoothing 0.1, per-epoch schedule, hard distillation "
                "from regnety_160), configs/resnet18_resnet50.json, timm 0.7.0dev0 default weights"),
        anchors="resnet18.tv_in1k,resnet50.a1_in1k", epochs=30, batch_size=128, lr=0.025, optimizer="sgd",
        momentum=0.9, nesterov=True, weight_decay=2e-5, warmup_epochs=5, warmup_lr=1e-5, warmup_prefix=False,
        schedule_unit="epoch", min_lr=0.0, clip_grad=None, label_smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1",
        train_interpolation="random", re_prob=0.6, re_mode="pixel", distill="regnety_160.deit_in1k",
        distill_type="hard", distill_alpha=0.5, init_images=100, notes=_RESNET_NOTES),
    Recipe(
        name="resnet-swin",
        source=(f"{_REF} stitching_resnet_swin: the same command and defaults as 'resnet' with "
                "configs/resnet18_swin_ti.json (timm 0.7.0dev0 default weights: torchvision ResNet-18, ImageNet-1k "
                "Swin-T)"),
        anchors="resnet18.tv_in1k,swin_tiny_patch4_window7_224.ms_in1k", epochs=30, batch_size=128, lr=0.025,
        optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=2e-5, warmup_epochs=5, warmup_lr=1e-5,
        warmup_prefix=False, schedule_unit="epoch", min_lr=0.0, clip_grad=None, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", train_interpolation="random", re_prob=0.6, re_mode="pixel",
        distill="regnety_160.deit_in1k", distill_type="hard", distill_alpha=0.5, init_images=100,
        notes=_RESNET_NOTES),
    Recipe(
        name="levit",
        source=(f"{_REF} stitching_levit: README.md training command (100 epochs, batch 128, lr 5e-5, warmup 1e-7, "
                "min 1e-6), main.py defaults (AdamW, weight decay 0.025, adaptive gradient clipping 0.01, 5 warm-up "
                "epochs, augmentation, repeated augmentation, hard distillation from regnety_160 with DeiT's weights), "
                "levit.py (drop-path 0 for LeViT-192/256)"),
        anchors="levit_192.fb_dist_in1k,levit_256.fb_dist_in1k", epochs=100, batch_size=128, lr=5e-5,
        optimizer="adamw", weight_decay=0.025, warmup_epochs=5, warmup_lr=1e-7, warmup_prefix=False,
        schedule_unit="epoch", min_lr=1e-6, clip_grad=0.01, clip_mode="agc", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, auto_augment="rand-m9-mstd0.5-inc1", train_interpolation="bicubic", re_prob=0.25,
        re_mode="pixel", repeated_aug=3, drop_path=0.0, distill="regnety_160.deit_in1k", distill_type="hard",
        distill_alpha=0.5, init_images=100,
        notes=_DEIT_NOTES),
)}


def get_recipe(name: str | None) -> Recipe:
    """The recipe called ``name`` (``None``: snnet's defaults)."""
    if name is None:
        return DEFAULT_RECIPE
    key = name.strip().lower().replace("_", "-")
    if key not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    return RECIPES[key]
