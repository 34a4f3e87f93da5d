"""The configuration of a training run: one tree of small frozen dataclasses, each default defined here once.

    TrainConfig
      task        what is learned and how a batch is scored (snnet.tasks)
      data        DataConfig      the dataset, its split and batches, augmentation, the targets
      model       ModelConfig     the anchors (or a saved network) and how they are built
      space       SpaceConfig     the stitch space and its stitching layers (snnet.space)
      optim       OptimConfig     optimizer, learning rate and its linear scaling rule, clipping
      schedule    ScheduleConfig  length of the run, warm-up, cosine decay
      distill     DistillConfig   the teacher and its loss
      sampling    SamplingConfig  which stitch each step trains, and how processes share that
      run         RunConfig       where and on what, seeding, checkpoints, logs, resuming

Every class checks its values when it is built (one line naming the setting), and nothing
else: whether a device exists is asked when a run starts (:func:`snnet.train.default_device`),
so a configuration written on a GPU machine loads on a CPU one.

A configuration is plain data. :meth:`TrainConfig.to_dict`/:meth:`TrainConfig.from_dict` and
:meth:`TrainConfig.to_yaml`/:meth:`TrainConfig.from_yaml` convert it exactly both ways; a
partial dict (a recipe, a config file that sets a few values) is layered onto the defaults
with :meth:`TrainConfig.merged`. Settings can be named by their path (``"optim.lr"``) or, since
every leaf name is unique in the tree, by their name alone (:meth:`TrainConfig.override`):

    from snnet.config import TrainConfig
    config = TrainConfig().override(epochs=5, lr=4e-4, out_dir="runs/x")
    config = TrainConfig.from_yaml("run.yaml")

This module depends on nothing in snnet but its errors, so that every other module (optim,
sampling, space, train, the commands) can import its configuration from below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, NotStitchableError

__all__ = ["AMP_MODES", "CLIP_MODES", "CUTS", "DDP_GRADS", "DISTILL_TYPES", "EVAL_PROTOCOLS", "INTERPOLATIONS", "MIXUP_MODES", "OPTIMIZERS",
           "RE_MODES", "ROS_GAP", "RULES", "SAMPLERS", "SCHEDULE_UNITS", "SECTIONS", "STITCH_SYNC", "TASKS", "UNPAIRED",
           "UNUSED_UPDATES", "DataConfig",
           "DistillConfig", "ModelConfig", "OptimConfig", "Rates", "RunConfig", "SamplingConfig", "ScheduleConfig",
           "SpaceConfig", "TrainConfig", "dump_yaml_text", "flatten", "from_legacy", "leaf_paths", "merge", "nest", "read_yaml",
           "setting_path"]

# The choices of the settings that name one of a few things (the modules that implement them import these).
TASKS = ("image-classification", "causal-lm")
OPTIMIZERS = ("adamw", "sgd", "lamb")
# what a step does to parameters that no route used in it (snnet.train): leave them ('skip'), or decay them and
# move them on their momentum as the reference's steps on PyTorch < 2.0 did ('reference'; docs/differences.md)
UNUSED_UPDATES = ("skip", "reference")
CLIP_MODES = ("norm", "value", "agc")
SCHEDULE_UNITS = ("step", "epoch")
SAMPLERS = ("uniform", "flops_bucketed", "ros", "weighted")
STITCH_SYNC = ("per_rank", "shared")
DDP_GRADS = ("mean", "users")
DISTILL_TYPES = ("soft", "hard")
AMP_MODES = ("auto", "off", "fp16", "bf16")
MIXUP_MODES = ("batch", "pair", "elem")
RE_MODES = ("const", "rand", "pixel")
# timm's resize interpolations (timm.data.transforms.str_to_interp_mode), and its training transform's 'random'
# (bilinear or bicubic, drawn per image), which 3-Augment's resize cannot take
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
# how validation images are resized and cropped: the SN-Net authors' way, or the anchors' own timm data config
EVAL_PROTOCOLS = ("paper", "timm")
RULES = ("window", "forward")  # how block pairs are enumerated inside a stage (snnet.space)
UNPAIRED = ("reference", "progress")  # how plain anchors of different depths are stitched (snnet.space)
# Where a stitch may cut an anchor: between its blocks (the paper), or also between a ViT block's attention
# and MLP sublayers (snnet.anchors.cut_parts): twice the cut points, in steps of half a block's FLOPs.
CUTS = ("block", "sublayer")
# ROS's default gap between FLOPs groups, as a share of the space's FLOPs range: the authors'
# 1 GFLOP on DeiT3-S/L's 4.6-61.6 GFLOPs, which groups that space as theirs does (13 groups).
ROS_GAP = 0.0175


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value: float | None, at_least: float = 0.0) -> bool:
    # isfinite: NaN passes every `x < 0` test, and an infinite value only shows up as a NaN loss later
    return value is None or (math.isfinite(value) and value >= at_least)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _need(value in allowed, f"unknown {name} {value!r}; use one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class DataConfig:
    """What a batch is: the dataset and its split, batches, augmentation and the training targets."""

    source: str = "fashion-mnist"
    """The image dataset: 'fashion-mnist', an ImageFolder directory, or a timm dataset name (torch/cifar10...)."""
    corpus: str = "stdlib"
    """causal-lm: the text trained on: 'stdlib' (this Python's standard library source) or a folder of text files."""
    block_size: int = 256
    """causal-lm: tokens a training sequence predicts (the context trained at; FLOPs per token are stated at it)."""
    held_out: float = 0.1
    """causal-lm: share of the corpus's files held out for validation (by a hash of each file's path)."""
    root: str | None = None
    """Where the dataset lives: the Fashion-MNIST IDX files' folder, a timm dataset's root."""
    split: str = "train"
    """The split trained on; Fashion-MNIST's 'train' leaves out the 10,000 validation images ('train+val': all).
    causal-lm: 'train' (the files not held out), 'val' (the held-out files) or 'all'."""
    download: bool = False
    """Fetch the dataset when it is not on disk (Fashion-MNIST through torchvision, timm datasets)."""
    limit: int | None = None
    """Use only N images (quick runs): of an image folder or timm dataset, N drawn with run.seed, spread over the
    classes (the same N on a resume); Fashion-MNIST's (stored shuffled): the first N. causal-lm: N token blocks, the
    first blocks of the split's files, an even share of each, read in an order drawn with run.seed, spread over the
    corpus (the same on a resume)."""
    skip_unreadable: bool = False
    """An image folder: decode every image first and leave out those that cannot be read (counted and reported)
    instead of stopping at the first one (which stops a run with one line naming the file, after a checkpoint)."""
    batch_size: int = 64
    """Images per step and process (the global batch is batch_size x processes)."""
    workers: int = 0
    """Data loader worker processes (results do not depend on it)."""
    augment: bool = True
    """Train-time augmentation: timm's training transform, or Fashion-MNIST's crop and flip."""
    crop_padding: int | None = None
    """Fashion-MNIST's random crop: pixels of zero padding the 28x28 crop is cut from (0: no crop, flips only;
    None: the dataset's 2). With ``augment`` false nothing is augmented; other datasets take timm's transform."""
    auto_augment: str | None = None
    """timm RandAugment/AutoAugment policy, e.g. 'rand-m9-mstd0.5-inc1'."""
    color_jitter: float = 0.4
    """timm's colour jitter strength (timm's default)."""
    interpolation: str | None = None
    """Training-time resize interpolation (None: the anchors' own; 'random', 'bicubic'...)."""
    re_prob: float = 0.0
    """Random erasing probability (timm's)."""
    re_mode: str = "pixel"
    """Random erasing fill: const, rand or pixel."""
    re_count: int = 1
    """Random erasing: regions per image."""
    re_splits: int = 1
    """Random erasing per batch: 1 erases each image in its transform; 2 leaves the first half of every batch clean
    and erases the rest after normalisation (timm's loader with --resplit, the reference ResNet runs)."""
    three_augment: bool = False
    """DeiT III's 3-Augment with simple random crop (SN-Netv2): resize, 4-pixel reflect-padded crop and flip, then
    one of greyscale, solarisation or blur, and colour jitter; replaces timm's training transform."""
    repeated_aug: int = 1
    """Copies of each image per epoch, consecutive copies on different processes (DeiT's; 1 = off)."""
    mixup: float = 0.0
    """timm Mixup's alpha (0: off); with mixup or cutmix the loss takes timm's soft targets."""
    cutmix: float = 0.0
    """timm CutMix's alpha (0: off)."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    mixup_mode: str = "batch"
    """Mixup per batch, pair or element."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy targets."""
    val_split: str | None = None
    """Evaluate every network on this split at each epoch's end (evals.jsonl); None: no validation."""
    eval_protocol: str | None = None
    """Validation images resized and cropped as the SN-Net authors did ('paper') or by the anchors' timm config
    ('timm'); None: the paper's for the families the paper trained, timm's for the rest (as `snnet eval`)."""

    def __post_init__(self) -> None:
        _need(self.limit is None or self.limit >= 1, f"data.limit must be >= 1 image, got {self.limit}")
        _need(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _need(self.crop_padding is None or self.crop_padding >= 0,
              f"data.crop_padding must be >= 0 pixels (0: flips only), got {self.crop_padding}")
        _need(self.block_size >= 1, f"data.block_size must be >= 1 token, got {self.block_size}")
        _need(0.0 < self.held_out < 1.0, f"data.held_out must be in (0, 1), got {self.held_out}")
        _need(self.workers >= 0, f"data.workers (data loader processes) must be >= 0, got {self.workers}")
        _need(_finite(self.color_jitter), f"data.color_jitter must be >= 0, got {self.color_jitter}")
        _need(0.0 <= self.re_prob <= 1.0, f"data.re_prob must be in [0, 1], got {self.re_prob}")
        _one_of("data.re_mode", self.re_mode, RE_MODES)
        _need(self.re_count >= 1, f"data.re_count must be >= 1, got {self.re_count}")
        _need(self.re_splits >= 1, f"data.re_splits must be >= 1 (1: every image), got {self.re_splits}")
        _need(not (self.three_augment and (self.auto_augment or self.re_prob > 0)),
              "data.three_augment replaces timm's training transform: drop data.auto_augment and data.re_prob")
        if self.interpolation:  # an unknown name failed only when the transform was built, 3-Augment's in a traceback
            _one_of("data.interpolation", self.interpolation, INTERPOLATIONS)
            _need(not (self.three_augment and self.interpolation == "random"),
                  "data.three_augment resizes with one interpolation: give data.interpolation bicubic (its default), "
                  "bilinear, ... not random")
        _need(self.repeated_aug >= 1, f"data.repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}")
        _need(_finite(self.mixup) and _finite(self.cutmix),
              f"data.mixup and data.cutmix must be >= 0 and finite, got {self.mixup}, {self.cutmix}")
        _need(0.0 <= self.mixup_prob <= 1.0 and 0.0 <= self.mixup_switch_prob <= 1.0,
              f"data.mixup_prob and data.mixup_switch_prob must be in [0, 1], got {self.mixup_prob}, "
              f"{self.mixup_switch_prob}")
        _one_of("data.mixup_mode", self.mixup_mode, MIXUP_MODES)
        _need(not self.mixing or self.batch_size % 2 == 0,
              f"mixup/cutmix need an even batch size (timm's Mixup pairs images), got {self.batch_size}")
        _need(0.0 <= self.label_smoothing < 1.0, f"data.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_protocol is not None:
            _one_of("data.eval_protocol", self.eval_protocol, EVAL_PROTOCOLS)

    @property
    def mixing(self) -> bool:
        """Whether mixup or CutMix is on."""
        return self.mixup > 0 or self.cutmix > 0

    def transform_options(self) -> dict[str, Any]:
        """Arguments for timm's training transform that differ from its defaults (empty without augmentation)."""
        if not self.augment:
            return {}
        options: dict[str, Any] = {}
        if self.auto_augment:
            options["auto_augment"] = self.auto_augment
        if self.three_augment:
            options.update(three_augment=True, color_jitter=self.color_jitter)
        if self.re_prob > 0 and self.re_splits == 1:  # split erasing happens on whole batches (snnet.tasks)
            options.update(re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count)
        if self.color_jitter != DataConfig.color_jitter:
            options["color_jitter"] = self.color_jitter
        if self.interpolation:
            options["interpolation"] = self.interpolation
        return options


@dataclass(frozen=True)
class ModelConfig:
    """The network trained: anchors built by name (or a saved stitched network), and how they start."""

    anchors: str = "fmnist"
    """A family (fmnist, deit, swin, resnet, levit, ...: snnet.adapters.FAMILIES) or comma-separated timm model names;
    causal-lm: an LM family (pythia, gpt2, ...) or comma-separated LM names, hub ids or local model folders."""
    weights: tuple[str, ...] | None = None
    """Local weight files, one per anchor (in the order of anchors)."""
    pretrained: bool | None = None
    """Load timm's pretrained weights (None: only snnet's shipped fmnist family loads its own).
    causal-lm: None or true loads every anchor through from_pretrained (a folder, or the hub); false: random init."""
    init: str | None = None
    """Start from a saved stitched network (a folder written by save_pretrained) instead of anchors."""
    num_classes: int | None = None
    """Give the anchors a new head with this many classes."""
    drop_path: float | tuple[float, ...] = 0.0
    """Stochastic depth of the anchors (timm's drop_path_rate), set when they are built: one rate for every anchor,
    or a list of one per anchor. 0 passes none: the anchor's timm default applies (0 for most; Swin's is 0.1)."""
    init_images: int = 100
    """Calibration images (causal-lm: token blocks) for the least-squares fit of the stitching layers (0: keep them)."""
    anchor_lora_rank: int = 0
    """causal-lm: LoRA adapters of this rank on the anchors through PEFT, the anchors' own weights frozen (ESTA's
    setting; 0: off, the anchors train whole)."""
    anchor_lora_alpha: float = 16.0
    """causal-lm: the anchors' LoRA updates are scaled by anchor_lora_alpha / anchor_lora_rank."""
    anchor_lora_targets: tuple[str, ...] | None = None
    """causal-lm: the anchors' modules that get adapters, by name (None: PEFT's defaults for each model type)."""

    def __post_init__(self) -> None:
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
        _need(self.num_classes is None or self.num_classes >= 1, f"model.num_classes must be >= 1, got {self.num_classes}")
        if isinstance(self.drop_path, (list, tuple)):
            object.__setattr__(self, "drop_path", tuple(self.drop_path))
        rates = self.drop_path if isinstance(self.drop_path, tuple) else (self.drop_path,)
        _need(bool(rates) and all(0.0 <= r < 1.0 for r in rates),
              f"model.drop_path must be in [0, 1) (one rate, or one per anchor), got {self.drop_path}")
        _need(self.init_images >= 0, f"model.init_images must be >= 0, got {self.init_images}")
        _need(self.anchor_lora_rank >= 0, f"model.anchor_lora_rank must be >= 0 (0: off), got {self.anchor_lora_rank}")
        _need(_finite(self.anchor_lora_alpha) and self.anchor_lora_alpha > 0,
              f"model.anchor_lora_alpha must be > 0, got {self.anchor_lora_alpha}")
        if self.anchor_lora_targets is not None:
            object.__setattr__(self, "anchor_lora_targets", tuple(self.anchor_lora_targets))
        _need(not (self.init is not None and max(rates) > 0),
              "model.drop_path is set when the anchors are built; a network loaded with model.init keeps its own: "
              "drop one of them")
        # a network loaded with model.init keeps its anchors' weights: files given were ignored (a num_classes other
        # than the saved network's is refused when it is loaded: snnet.model.network_from_config)
        _need(not (self.init is not None and self.weights is not None),
              "model.weights is set when the anchors are built; a network loaded with model.init keeps its own weights: "
              "drop it or model.init")

    def anchor_kwargs(self, anchor: int = 0, anchors: int = 1) -> tuple[tuple[str, Any], ...]:
        """Keyword arguments for building anchor ``anchor`` of ``anchors`` (sorted pairs, as an AnchorSpec holds them)."""
        if isinstance(self.drop_path, tuple):
            _need(len(self.drop_path) == anchors,
                  f"model.drop_path gives {len(self.drop_path)} rates for {anchors} anchors: give one per anchor, or one")
            rate = self.drop_path[anchor]
        else:
            rate = self.drop_path
        kwargs = {"drop_path_rate": rate} if rate > 0 else {}
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return tuple(sorted(kwargs.items()))


@dataclass(frozen=True)
class SpaceConfig:
    """Which networks the anchors yield and the stitching layers that join them (see snnet.space)."""

    kernel_size: int = 2
    """Sliding-window size of paired stitching."""
    stride: int = 1
    """Sliding-window stride of paired stitching."""
    nearest: bool = True
    """Stitch each anchor only to the next one in cost (False: every pair)."""
    stages: tuple[int, ...] | None = None
    """Stages that may be stitched (None: each adapter's default)."""
    rule: str | None = None
    """'window' or 'forward' block pairs (None: each adapter's default)."""
    unpaired: str = "reference"
    """Anchors of unequal depth: 'reference' (the authors' mapping) or 'progress' (snnet's earlier rule)."""
    two_way: bool = False
    """SN-Netv2's space: small->large, large->small and the round trips, at matched positions."""
    chains: bool = False
    """The v1 reference's three-anchor routes (Ti->S->B)."""
    routes: tuple[str, ...] | None = None
    """Explicit route names (e.g. KLAS's choice, `snnet stitches --select klas --json`): replace the rules."""
    lora_rank: int | None = None
    """Low-rank stitching layers (SN-Netv2) of this rank (0: full layers; None: 0, or as saved with model.init)."""
    lora_alpha: float = 1.0
    """The low-rank update is scaled by lora_alpha / lora_rank."""
    cut: str = "block"
    """Where stitches cut the anchors: 'block' (between blocks, the paper) or 'sublayer' (ViTs only: also
    between a block's attention and its MLP, so route indices count sublayers, two a block)."""

    def __post_init__(self) -> None:
        _need(self.kernel_size >= 1 and self.stride >= 1,
              f"kernel_size and stride must be >= 1, got {self.kernel_size}, {self.stride}")
        if self.rule is not None:
            _one_of("stitching rule", self.rule, RULES)
        _one_of("unpaired rule", self.unpaired, UNPAIRED)
        _one_of("space.cut", self.cut, CUTS)
        for name in ("stages", "routes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):  # tuple() would read text letter by letter
                got = f"the text {value!r}" if isinstance(value, str) else repr(value)
                raise ConfigError(f"{name} is a list, got {got}: pass [{value!r}]")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.routes is not None and not self.routes:
            raise NotStitchableError("an explicit list of routes must name at least one stitch")
        if self.stages is not None:
            # a repeated stage listed its stitches twice, and the space blamed the routes ("name each stitch once")
            _need(all(isinstance(s, int) and not isinstance(s, bool) for s in self.stages)
                  and len(set(self.stages)) == len(self.stages),
                  f"stages are distinct stage numbers (the first stage is 0), got {list(self.stages)}")
        _need(self.lora_rank is None or self.lora_rank >= 0,
              f"space.lora_rank must be >= 0 (0: full stitching layers), got {self.lora_rank}")
        _need(_finite(self.lora_alpha) and self.lora_alpha > 0, f"space.lora_alpha must be > 0, got {self.lora_alpha}")

    @property
    def is_v1(self) -> bool:
        """True when the space is SN-Net's own (what snnet before v2 could save and read)."""
        return not (self.two_way or self.chains or self.routes is not None)

    # A saved network's config.json keeps the space under "space" (these keys) and its stitching
    # layers' rank under "stitching", as before the rank was a setting of the space.
    _SAVED = ("kernel_size", "stride", "nearest", "stages", "rule", "unpaired", "two_way", "chains", "routes")

    def to_dict(self) -> dict[str, Any]:
        """The space as a saved network records it (its rank is recorded with its layers)."""
        d = {k: getattr(self, k) for k in self._SAVED}
        d["stages"] = list(self.stages) if self.stages is not None else None
        d["routes"] = list(self.routes) if self.routes is not None else None
        if self.cut != "block":  # written only when set: a network cut between blocks is saved as before
            d["cut"] = self.cut
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpaceConfig":
        """The space of a saved network's config.json."""
        stages, routes = d.get("stages"), d.get("routes")
        # a config saved before the unpaired option existed was built with the "progress" rule
        return cls(int(d["kernel_size"]), int(d["stride"]), bool(d["nearest"]), tuple(stages) if stages is not None else None,
                   d.get("rule"), d.get("unpaired", "progress"), bool(d.get("two_way", False)),
                   bool(d.get("chains", False)), tuple(routes) if routes is not None else None,
                   cut=d.get("cut", "block"))


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, its learning rate and the linear scaling rule, gradient clipping (snnet.optim)."""

    lr: float = 4e-4
    """Learning rate of the stitching layers at a global batch of lr_base_batch (5e-5 at the default batch of 64)."""
    lr_base_batch: int | None = 512
    """The linear scaling rule: the rate used is lr x batch_size x processes / lr_base_batch (None: lr as given)."""
    scale_lr_bounds: bool = False
    """Scale the warm-up start and the floor of the schedule by the same rule (the reference Swin code)."""
    anchor_lr_scale: float = 1.0
    """The anchors' own parameters learn at this multiple of lr (0.1 in the reference Swin code)."""
    optimizer: str = "adamw"
    """adamw (decoupled weight decay), sgd (timm's: Nesterov momentum, L2 weight decay) or lamb (timm's LAMB)."""
    weight_decay: float = 0.05
    """Weight decay of weights (biases, norms, position embeddings and class tokens get none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    momentum: float = 0.9
    """SGD's momentum."""
    nesterov: bool = True
    """SGD with Nesterov momentum."""
    clip_grad: float | None = 5.0
    """Gradient clipping threshold (None: off)."""
    clip_mode: str = "norm"
    """timm's clipping: norm, value or agc (adaptive)."""
    unused_updates: str = "skip"
    """Parameters no route used in a step: 'skip' leaves them; 'reference' decays them and moves them on their
    momentum once they have been stepped, as the reference's runs on PyTorch < 2.0 did (docs/differences.md)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _need(_finite(self.lr) and self.lr > 0, f"optim.lr must be > 0 and finite, got {self.lr:g}")
        _need(self.lr_base_batch is None or self.lr_base_batch >= 1,
              f"optim.lr_base_batch must be >= 1 (or null: no scaling), got {self.lr_base_batch}")
        bad = [f"optim.{k}={v}" for k in ("anchor_lr_scale", "weight_decay", "momentum", "eps")
               if not _finite(v := getattr(self, k))]
        _need(not bad, f"{', '.join(bad)}: must be >= 0 and finite")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _need(self.clip_grad is None or (_finite(self.clip_grad) and self.clip_grad > 0),
              f"optim.clip_grad must be > 0 and finite, or null, got {self.clip_grad}")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        # torch's SGD refuses Nesterov without momentum, from deep inside the optimizer, when the run starts
        _need(not (self.optimizer == "sgd" and self.nesterov and self.momentum == 0),
              "optim.nesterov needs optim.momentum > 0: for plain SGD give --optim.nesterov false too")
        _one_of("optim.clip_mode", self.clip_mode, CLIP_MODES)
        _one_of("optim.unused_updates", self.unused_updates, UNUSED_UPDATES)


@dataclass(frozen=True)
class ScheduleConfig:
    """How long the run is, and the learning rate over it: linear warm-up, then cosine decay (snnet.optim)."""

    epochs: int | None = 1
    """Epochs over the training set (None: as many as max_steps needs)."""
    max_steps: int | None = None
    """Stop after this many steps (the schedule spans the capped length)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    warmup_epochs: float = 0.0
    """Linear warm-up in epochs (used when warmup_steps is 0)."""
    warmup_ratio: float = 0.0
    """Linear warm-up as a share of the run's steps, at least one (used when the other two are 0)."""
    warmup_lr: float | None = None
    """Rate at the first warm-up step (None: snnet's ramp lr x (k + 1) / (warm-up + 1))."""
    warmup_prefix: bool = True
    """Start the cosine after the warm-up (False: the cosine spans the whole run, timm's default)."""
    min_lr: float = 1e-6
    """The rate at the end of the cosine."""
    min_lr_ratio: float | None = None
    """The end rate as a share of the peak rate instead of min_lr (None: use min_lr)."""
    unit: str = "step"
    """Change the rate every 'step', or once an 'epoch' as the reference's per-epoch schedulers."""

    def __post_init__(self) -> None:
        _need(self.epochs is None or self.epochs >= 1, f"schedule.epochs must be >= 1, got {self.epochs}")
        _need(self.max_steps is None or self.max_steps >= 1, f"schedule.max_steps must be >= 1, got {self.max_steps}")
        _need(self.epochs is not None or self.max_steps is not None,
              "schedule.epochs is null (as many as the steps need): give schedule.max_steps")
        _need(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        bad = [f"schedule.{k}={v}" for k in ("warmup_epochs", "warmup_lr", "min_lr") if not _finite(v := getattr(self, k))]
        _need(not bad, f"{', '.join(bad)}: must be >= 0 and finite")
        _need(0.0 <= self.warmup_ratio < 1.0, f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _need(self.min_lr_ratio is None or 0.0 <= self.min_lr_ratio <= 1.0,
              f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _one_of("schedule.unit", self.unit, SCHEDULE_UNITS)

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in steps: the epochs', capped by max_steps."""
        total = self.epochs * steps_per_epoch if self.epochs is not None else self.max_steps
        return min(total, self.max_steps) if self.max_steps is not None else total  # type: ignore[type-var,return-value]

    def warmup(self, steps_per_epoch: int, total_steps: int) -> int:
        """Warm-up steps: warmup_steps, else warmup_epochs, else warmup_ratio of the run (at least one)."""
        if self.warmup_steps:
            return self.warmup_steps
        if self.warmup_epochs:
            return round(self.warmup_epochs * steps_per_epoch)
        if self.warmup_ratio:
            return max(1, math.floor(self.warmup_ratio * total_steps))
        return 0


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation while training (snnet.distill)."""

    teacher: str | None = None
    """None, 'largest' (a frozen copy of the largest anchor) or a timm model name (its own pretrained head);
    causal-lm: an LM name, hub id or folder sharing the anchors' tokenizer (KL on every position)."""
    type: str = "soft"
    """'soft' (KL at the temperature) or 'hard' (cross-entropy on the teacher's top class, DeiT's)."""
    alpha: float = 0.5
    """Weight of the distillation term (the rest is the task's own loss)."""
    temperature: float = 1.0
    """Temperature of soft distillation."""

    def __post_init__(self) -> None:
        _one_of("distill.type", self.type, DISTILL_TYPES)
        _need(0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha}")
        _need(_finite(self.temperature) and self.temperature > 0,
              f"distill.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class SamplingConfig:
    """Which stitch each step trains, and how processes share that (snnet.sampling, snnet.train)."""

    sampler: str = "uniform"
    """'uniform' (the paper's), 'flops_bucketed', 'ros' (SN-Netv2's resource-constrained sampling) or 'weighted'
    (uniform but for the weighted_stitches, drawn stitch_weight times as often)."""
    num_buckets: int = 4
    """FLOPs buckets of the flops_bucketed sampler."""
    ros_gap: float = ROS_GAP
    """ROS: FLOPs gap that opens a new group, as a share of the space's FLOPs range."""
    ros_ramp: float | None = None
    """ROS: draw the i-th cheapest of G groups with weight i/K + 1/G (None: uniformly)."""
    weighted_stitches: tuple[int | str, ...] | None = None
    """Weighted sampler: the stitches (ids or names, as `snnet stitches` lists them) drawn more often."""
    stitch_weight: float = 2.0
    """Weighted sampler: how many times as often each of those is drawn as each other stitch."""
    stitch_sync: str = "per_rank"
    """Several processes: each its own stitch per step ('per_rank', the paper's) or one for all ('shared')."""
    ddp_grads: str = "mean"
    """Several processes, per-rank stitches: DDP's mean over all ranks, or 'users' (over the ranks whose route used it)."""

    def __post_init__(self) -> None:
        _one_of("sampler", self.sampler, SAMPLERS)
        _need(self.num_buckets >= 1, f"sampling.num_buckets must be >= 1, got {self.num_buckets}")
        _need(_finite(self.ros_gap) and (self.ros_ramp is None or (_finite(self.ros_ramp) and self.ros_ramp > 0)),
              f"sampling.ros_gap must be >= 0 and ros_ramp > 0 (or null), got {self.ros_gap}, {self.ros_ramp}")
        _need(_finite(self.stitch_weight) and self.stitch_weight > 0,
              f"sampling.stitch_weight must be > 0, got {self.stitch_weight}")
        _need(self.sampler != "weighted" or bool(self.weighted_stitches),
              "the weighted sampler needs sampling.weighted_stitches: the ids or names of the stitches to draw more often")
        _one_of("stitch_sync", self.stitch_sync, STITCH_SYNC)
        _one_of("ddp_grads", self.ddp_grads, DDP_GRADS)


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, what it runs on, its seed, checkpoints and logs, and how it resumes (snnet.train)."""

    out_dir: str = "runs/snnet"
    """The run's folder: checkpoint.pt, metrics.jsonl, train_config.json, final/."""
    seed: int = 0
    """Seed of everything random: random-init weights, data order, stitch sampling, augmentation."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps (None: cuda if there is one). Checked when the run starts."""
    amp: str = "auto"
    """Mixed precision: 'auto' (float16 on CUDA, off elsewhere), 'bf16', 'fp16' or 'off'."""
    fsdp: bool = False
    """Several processes: shard parameters, gradients and optimizer state over them (torch's fully_shard, one unit
    per block) instead of a full copy on each (DDP): anchors that do not fit one device. Needs stitch_sync 'shared'."""
    ckpt_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept: the latest (checkpoint.pt) and earlier copies in checkpoints/ to go back to."""
    log_every: int = 10
    """Steps between progress-bar updates of the mean loss."""
    progress: bool = True
    """Show progress bars."""
    tensorboard: bool = True
    """Write TensorBoard scalars to OUT/tb (when tensorboard is installed)."""
    resume: str | None = None
    """A checkpoint file or run folder to continue, or 'auto' (OUT/checkpoint.pt if there is one)."""
    overwrite: bool = False
    """Delete the run already in out_dir and start afresh (without it, or resume, such a folder is refused)."""
    resume_with_changes: bool = False
    """Resume even though settings that change the result differ from the checkpoint's (the history is kept)."""

    def __post_init__(self) -> None:
        _need(0 <= self.seed < 2**32, f"run.seed must be in [0, 2**32), got {self.seed}")
        _one_of("amp mode", self.amp, AMP_MODES)
        _need(self.ckpt_every >= 0, f"run.ckpt_every must be >= 0, got {self.ckpt_every}")
        _need(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _need(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        _need(not (self.overwrite and self.resume is not None),
              "--overwrite deletes the run that --resume would continue: give one of them (run.overwrite may come "
              "from a recipe or --config file, as the demo's does: then add --run.overwrite false)")


@dataclass(frozen=True)
class Rates:
    """The learning rates a run uses, after the linear scaling rule (:meth:`TrainConfig.rates`)."""

    lr: float  # the stitching layers' peak rate
    min_lr: float  # the end of the cosine
    warmup_lr: float | None  # the first warm-up step's rate (None: snnet's ramp)
    scale: float  # lr / optim.lr
    global_batch: int
    world_size: int


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (see the module docstring for the tree)."""

    task: str = "image-classification"
    """What is learned, and how a batch is scored (snnet.tasks)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _one_of("task", self.task, TASKS)
        for name, cls in SECTIONS.items():
            _need(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        _need(not (self.run.fsdp and self.model.anchor_lora_rank),
              "run.fsdp with model.anchor_lora_rank is not supported: adapters are merged on one process when the "
              "network is saved; train LoRA adapters with DDP (drop run.fsdp)")
        _need(not self.run.fsdp or self.sampling.stitch_sync == "shared",
              "run.fsdp shards every block over the processes, so all of them must run the same route each step: "
              "set sampling.stitch_sync to 'shared'")

    # -- reading and writing
    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as YAML and JSON hold it; :meth:`from_dict` takes it back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """A configuration from nested plain data, missing values at their defaults; unknown keys and
        values of the wrong kind are refused in one line naming the setting."""
        return _build(cls, data, "")

    def to_yaml(self) -> str:
        """YAML of every setting, in the tree's order (:meth:`from_yaml` reads it back exactly)."""
        return dump_yaml_text(self.to_dict())

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """A configuration file (every setting, or only some: the rest at their defaults). A file that names
        its recipe (``recipe: deit``) is read by :func:`snnet.recipes.read_config`, which lays it over it."""
        data = read_yaml(path)
        if "recipe" in data:  # snnet.recipes.BASE_KEY; the recipes build on this module, which does not read them
            raise ConfigError(f"{path} names recipe {data['recipe']!r}: read it with snnet.recipes.read_config, which lays "
                              "it over that recipe (as snnet train --config does)")
        return cls().merged(data)

    def merged(self, changes: Mapping[str, Any]) -> "TrainConfig":
        """A copy with the settings of a partial nested dict (a recipe, a config file) laid over these."""
        return TrainConfig.from_dict(merge(self.to_dict(), changes))

    def override(self, changes: Mapping[str, Any] | None = None, /, **leaves: Any) -> "TrainConfig":
        """A copy with settings changed, named by path (``{"optim.lr": 1e-3}``) or by leaf name (``lr=1e-3``)."""
        flat: dict[str, Any] = {}
        for key, value in {**(changes or {}), **leaves}.items():
            path = setting_path(key)
            if path is None:
                raise ConfigError(f"unknown setting {key!r}{_did_you_mean(key, list(leaf_paths()))}")
            flat[path] = value
        return self.merged(nest(flat))

    # -- what the settings imply
    def rates(self, world_size: int = 1) -> Rates:
        """The learning rates used on ``world_size`` processes: the linear scaling rule applied."""
        if world_size < 1:
            raise ConfigError(f"the number of processes must be >= 1, got {world_size}")
        o, s = self.optim, self.schedule
        batch = self.data.batch_size * world_size
        scale = batch / o.lr_base_batch if o.lr_base_batch is not None else 1.0
        lr = o.lr * scale
        bound = scale if o.scale_lr_bounds else 1.0
        min_lr = lr * s.min_lr_ratio if s.min_lr_ratio is not None else s.min_lr * bound
        warmup_lr = s.warmup_lr * bound if s.warmup_lr is not None else None
        return Rates(lr, min_lr, warmup_lr, scale, batch, world_size)

    def describe_rates(self, world_size: int = 1) -> str:
        """The learning rates this run uses, in one line (printed when a run starts)."""
        r = self.rates(world_size)
        batch = f"{self.data.batch_size} x {world_size} process{'es' if world_size > 1 else ''}"
        if self.optim.lr_base_batch is None:
            text = f"learning rate {r.lr:.4g} (as given, not scaled) at global batch {r.global_batch} ({batch})"
        else:
            text = (f"learning rate: base {self.optim.lr:g} at batch {self.optim.lr_base_batch} -> {r.lr:.4g} at "
                    f"global batch {r.global_batch} ({batch})")
        if self.optim.anchor_lr_scale != 1.0:
            text += f"; anchors {r.lr * self.optim.anchor_lr_scale:.4g}"
        if r.warmup_lr is not None:
            text += f"; warm-up from {r.warmup_lr:.4g}"
        return text + f"; down to {r.min_lr:.4g}"


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "space": SpaceConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "distill": DistillConfig, "sampling": SamplingConfig,
                             "run": RunConfig}


# Settings named as before the tree (flat TrainConfig/OptimConfig and Recipe fields, snnet <= fa1757f) whose
# name is not their leaf name now; every other old name is its leaf name (batch_size -> data.batch_size).
LEGACY_NAMES = {"distill": "distill.teacher", "distill_alpha": "distill.alpha", "distill_temperature": "distill.temperature",
                "distill_type": "distill.type", "num_workers": "data.workers", "schedule_unit": "schedule.unit",
                "train_interpolation": "data.interpolation"}


def setting_path(name: str) -> str | None:
    """The path of a setting named by its path (``optim.lr``), its leaf name (``lr``) or its name before
    the tree (``distill_alpha``); None if there is no such setting."""
    if "." in name:
        section, _, leaf = name.partition(".")
        return name if section in SECTIONS and leaf in {f.name for f in dataclasses.fields(SECTIONS[section])} else None
    if name == "task":
        return name
    return LEGACY_NAMES.get(name) or leaf_paths().get(name)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` as ``{"optim": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        target = out
        *parents, last = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = _plain(value)
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` as ``{"optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_legacy(train: Mapping[str, Any], optim: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of a run saved before the tree (its flat TrainConfig and OptimConfig dicts) as a partial
    nested dict of today's tree. Its learning rate was the rate used: ``optim.lr_base_batch`` is null."""
    flat = {setting_path(k): v for k, v in {**train, **(optim or {})}.items() if setting_path(k) is not None}
    if optim is not None:
        flat["optim.lr_base_batch"] = None
    return nest(flat)


@functools.cache
def leaf_paths() -> dict[str, str]:
    """Every setting's name -> its path in the tree (``"lr" -> "optim.lr"``); names are unique in the tree."""
    paths: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in paths, f"{f.name} is in two sections"  # keeps override(name=...) unambiguous
            paths[f.name] = f"{section}.{f.name}"
    return paths


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid onto ``base``: nested dicts merged key by key, any other value replaced; a None over a dict
    (a section of a YAML file with every setting under it commented out, ``data:`` alone) changes nothing."""
    out = dict(base)
    for key, value in over.items():
        if value is None and isinstance(out.get(key), Mapping):
            continue  # no setting holds a dict: it is a section, which the empty one set to null, its values lost
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# YAML 1.2's floats with an unsigned exponent (1e3, 1.5e3, -2E5), which jsonargparse's loader (`--config FILE`) reads as numbers
# though PyYAML's YAML 1.1 resolver writes them bare as strings
_FLOAT_OF_YAML_1_2 = r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"


def dump_yaml_text(data: Any) -> str:
    """``data`` as YAML, a text setting that reads as a number in YAML 1.2 (a folder named ``1e3``) quoted, so
    that `--config` (jsonargparse's loader) reads the file back as it was written, not as a number."""
    import re

    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_OF_YAML_1_2), list("-+0123456789"))
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=1 << 16)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or :class:`ConfigError` in one line (missing, unreadable, not a mapping)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" if not p.exists() else f"config file {p} is not a file")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {p} cannot be read as YAML ({first})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings (data:, optim:, ...), not {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- plain data <-> dataclasses


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON hold."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the configuration'} must be a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        at = f"{where}." if where else ""
        leaf = setting_path(str(unknown[0])) if not where and "." not in str(unknown[0]) else None  # lr: at the top
        hint = (_did_you_mean(str(unknown[0]), names, at) or (f" (did you mean {leaf}?)" if leaf else "")
                or f"; {where or 'the configuration'} has {', '.join(names)}")
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(at + str(k) for k in unknown)}"
                          + hint)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """``value`` as the annotation ``kind`` wants it, or ConfigError naming the setting."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for k in kinds:
            try:
                return _coerce(k, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {' or '.join(_kind_name(k) for k in kinds)} or null, got {value!r}")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                return tuple(_coerce(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(items, value)))
        raise ConfigError(f"{where} must be {_kind_name(kind)}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {_kind_name(kind)}, got {value!r}")


def _did_you_mean(name: str, names: list[str], prefix: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def _kind_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_kind_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} numbers"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}.get(kind, str(kind))
