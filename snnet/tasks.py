"""What is learned: the one place that knows what a batch is and how it is scored.

Training (:mod:`snnet.train`), evaluation (:mod:`snnet.evaluate`) and distillation ask the task
of the run (``TrainConfig.task``) rather than assume images and labels, so a second modality is
a second class here, not changes to the loop.

* :class:`ImageClassification` (``"image-classification"``): batches of ``(images, labels)``;
  the training loss is cross-entropy with label smoothing, or timm's soft-target cross-entropy
  on Mixup/CutMix-mixed targets; scored by top-1 and top-5 accuracy and mean cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .config import TASKS, DataConfig, DistillConfig
from .errors import ConfigError, SnnetError

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ["ImageClassification", "Scores", "Tally", "get_task"]


class Tally:
    """Running top-1/top-k hits and summed loss of one network, kept on the device (no sync per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.hits1 = torch.zeros((), dtype=torch.long, device=device)
        self.hits5 = torch.zeros((), dtype=torch.long, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[-1])
        hit = logits.topk(k, dim=-1).indices == target[:, None]
        self.hits1 += hit[:, 0].sum()
        self.hits5 += hit.any(dim=-1).sum()
        self.loss += F.cross_entropy(logits, target, reduction="sum").double()
        self.seen += len(target)

    def scores(self) -> "Scores":
        n = max(self.seen, 1)
        return Scores(100.0 * self.hits1.item() / n, 100.0 * self.hits5.item() / n, self.loss.item() / n, self.seen)


@dataclass(frozen=True)
class Scores:
    """One network on one dataset: top-1 and top-5 accuracy in percent, mean cross-entropy, images seen."""

    acc1: float
    acc5: float
    loss: float
    images: int


class ImageClassification:
    """Images and class labels (see the module docstring).

    ``data`` gives the training targets (label smoothing, Mixup/CutMix); ``num_classes`` the
    classes the network predicts.
    """

    name = "image-classification"

    def __init__(self, data: DataConfig = DataConfig(), num_classes: int = 1000) -> None:
        self.num_classes = num_classes
        # random erasing of whole batches (data.re_splits > 1): built per device when the first batch comes
        self._erase_how = (data.re_prob, data.re_mode, data.re_count, data.re_splits) if data.re_splits > 1 else None
        self._erase: dict[str, Any] = {}
        self.mixup = None
        if data.mixing:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            # timm's Mixup smooths the labels itself and yields soft targets
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
                               switch_prob=data.mixup_switch_prob, mode=data.mixup_mode,
                               label_smoothing=data.label_smoothing, num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=data.label_smoothing)

    # -- training
    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch as the loss takes it: split-batch random erasing (``data.re_splits``), then Mixup/CutMix
        (soft targets), as timm's loader and training script apply them; or as it is."""
        if self._erase_how is not None and self._erase_how[0] > 0:
            x = self.erase(x)
        return self.mixup(x, y) if self.mixup is not None else (x, y)

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing of a normalised batch on its device, the first ``1/re_splits`` of it left clean
        (:func:`snnet.data.split_batch_erasing`); a new tensor, the loader's batch untouched."""
        from .data import split_batch_erasing

        key = str(x.device)
        if key not in self._erase:
            self._erase[key] = split_batch_erasing(*self._erase_how, device=x.device)  # type: ignore[misc]
        return self._erase[key](x.clone())

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of ``logits`` against (possibly mixed) targets."""
        return self.criterion(logits, target)

    @staticmethod
    def distill(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
        """The distillation term between the student's and the teacher's logits (snnet.distill)."""
        from .distill import distill_loss

        return distill_loss(student.float(), teacher.float(), config.type, config.temperature)

    # -- data
    @staticmethod
    def dataset(data: DataConfig, data_config: Any, seed: int, *, split: str | None = None,
                train: bool = True, limit: int | None = None) -> Dataset:
        """The dataset ``data`` names, read with the anchors' ``data_config``: its training split,
        augmented as ``data`` says (``train``), or another ``split`` as it is (evaluation; ``limit``)."""
        from .data import build_dataset

        return build_dataset(data.source, split or data.split, data_config, augment=train and data.augment,
                             limit=data.limit if train else limit, root=data.root, download=data.download, seed=seed,
                             transform_options=data.transform_options() if train else None)

    # -- scoring
    @staticmethod
    def tally(device: torch.device) -> Tally:
        """A fresh running score (top-1, top-5, cross-entropy) for one network."""
        return Tally(device)

    @staticmethod
    def check_batch(net: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of a batch, refused in one line when it cannot be scored by ``net``."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise SnnetError("evaluate needs a loader of (images, labels) batches")
        x, y = batch[0], batch[1]
        size = tuple(getattr(net, "input_size", ()) or ())
        if size and (x.ndim != 4 or x.shape[1] != size[0]):
            raise SnnetError(f"images of shape {tuple(x.shape[1:])} do not fit this network, which takes "
                             f"{size} (channels, height, width): use the data it was trained on")
        classes = getattr(net, "num_classes", None)
        if isinstance(classes, int):
            bad = y[(y < 0) | (y >= classes)]
            if len(bad):  # cross_entropy would fail with an index error (or a CUDA assert)
                raise SnnetError(f"label {int(bad[0])} is outside the network's {classes} classes: "
                                 "the data does not match this network's head")
        return x, y

    @staticmethod
    def check_dataset(net: nn.Module, dataset: Dataset, batch_size: int) -> int:
        """Fail before training if ``dataset`` cannot train ``net``; returns its size."""
        from .data import DatasetError, num_classes as dataset_classes

        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as e:
            raise DatasetError("the training dataset has no length; snnet needs a map-style dataset") from e
        if n == 0:
            raise DatasetError("the training dataset is empty: point --data.source/--data.root at a folder with images")
        try:
            classes = dataset_classes(dataset)
        except DatasetError:
            classes = None  # a plain tensor dataset: nothing to compare
        predicts = getattr(net, "num_classes", None)
        if classes is not None and isinstance(predicts, int) and classes != predicts:
            raise DatasetError(
                f"the dataset has {classes} classes but the network predicts {predicts}: rebuild the "
                f"network with num_classes={classes} (--model.num_classes {classes}) or use matching data")
        size = tuple(getattr(net, "input_size", ()) or ())
        x = dataset[0][0]
        if size and tuple(x.shape) != size:
            raise DatasetError(
                f"the dataset's images are {tuple(x.shape)} but the network takes {size}; "
                "build the dataset with the anchors' data config (net.anchors[0].data_config)")
        if n < batch_size:
            raise DatasetError(f"the dataset has {n} images, fewer than one batch of {batch_size}: lower "
                               "--data.batch_size")
        return n


_TASKS = {ImageClassification.name: ImageClassification}
assert tuple(_TASKS) == TASKS, "snnet.config.TASKS names the tasks implemented here"


def get_task(name: str, data: DataConfig = DataConfig(), net: "StitchedNet | nn.Module | None" = None) -> ImageClassification:
    """The task called ``name``, set up for ``data``'s targets and ``net``'s classes."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; use one of {', '.join(_TASKS)}")
    classes = getattr(net, "num_classes", None) if net is not None else None
    return _TASKS[name](data, classes if isinstance(classes, int) else 1000)
