"""What is learned: the one place that knows what a batch is and how it is scored.

Training (:mod:`snnet.train`), evaluation (:mod:`snnet.evaluate`) and distillation ask the task
of the run (``TrainConfig.task``) rather than assume images and labels, so a second modality is
a second class here, not changes to the loop.

* :class:`ImageClassification` (``"image-classification"``): batches of ``(images, labels)``;
  the training loss is cross-entropy with label smoothing, or timm's soft-target cross-entropy
  on Mixup/CutMix-mixed targets; scored by top-1 and top-5 accuracy and mean cross-entropy.
* :class:`CausalLM` (``"causal-lm"``): batches of ``{"input_ids", "bytes"}`` token blocks of a
  text corpus (:mod:`snnet.text`); the loss is next-token cross-entropy at every position,
  distillation a KL (or the teacher's top token) at every position; scored by perplexity, bits
  per byte and next-token accuracy of every network (:func:`snnet.lm_eval.evaluate_lm`).

Besides scoring, a task knows what the loop must not assume: how a batch splits into inputs
and targets (:meth:`inputs`), its network (:meth:`build_network`), its dataset, its teacher and
how the stitching layers are fitted before training (:meth:`fit_stitching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .config import TASKS, DataConfig, DistillConfig, TrainConfig
from .errors import ConfigError, SnnetError

if TYPE_CHECKING:
    from .model import StitchedBase, StitchedNet

__all__ = ["CausalLM", "ImageClassification", "Scores", "Tally", "Task", "get_task"]


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

    def __init__(self, data: DataConfig = DataConfig(), num_classes: int = 1000, check_labels: bool = True) -> None:
        self.num_classes = num_classes
        self.input_size: tuple[int, ...] | None = None  # of a training image, once check_dataset has read one
        # refuse training labels outside the network's classes (False: a model that does not say how many it predicts)
        self.check_labels = check_labels
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

    # -- the network
    @staticmethod
    def build_network(config: TrainConfig) -> "StitchedNet":
        """The stitched network ``config.model`` and ``config.space`` name (:func:`snnet.model.network_from_config`)."""
        from .model import network_from_config

        if config.model.anchor_lora_rank:
            raise ConfigError("model.anchor_lora_rank puts PEFT adapters on language-model anchors (task causal-lm); "
                              "image networks have low-rank stitching layers: space.lora_rank")
        return network_from_config(config.model, config.space)

    # -- training
    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of a training batch; a label outside the network's classes is refused in one line."""
        y = _class_ids(batch[1])
        # on the loader's CPU batch (no device sync): cross_entropy would fail with "Target 17 is out of bounds"
        if (self.check_labels and isinstance(y, torch.Tensor) and y.device.type == "cpu" and y.ndim == 1
                and not y.is_floating_point() and len(y)):
            bad = _label_outside(y, self.num_classes)
            if bad is not None:
                raise SnnetError(f"training label {bad} is outside the network's {self.num_classes} "
                                 f"classes (0 to {self.num_classes - 1}): number the classes from 0, or build the "
                                 "network with as many classes as the data has (--model.num_classes)")
        return batch[0], y

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

    @staticmethod
    def build_teacher(net: "StitchedBase | nn.Module", name: str) -> nn.Module | None:
        """The frozen teacher ``distill.teacher`` names: the largest anchor's copy, or a timm model (checked)."""
        from .distill import TeacherError, build_teacher
        from .model import StitchedNet

        if not isinstance(net, StitchedNet) and name == "largest":
            raise TeacherError("distill.teacher 'largest' is a stitched network's largest anchor: give this model a "
                               "teacher module (train(..., teacher=...)) or a timm model name")
        return build_teacher(net, name)  # type: ignore[arg-type]

    def check_teacher(self, teacher: nn.Module, net: nn.Module) -> None:
        """Refuse a teacher whose classes are not the network's, or that shares its weights (probed on the training
        images' shape once :meth:`check_dataset` has seen them: a plain model does not say what it takes)."""
        from .distill import check_teacher

        check_teacher(teacher, net, input_size=self.input_size)

    @staticmethod
    def fit_stitching(net: "StitchedNet", data: Dataset, config: TrainConfig) -> None:
        """The least-squares init of every stitching layer on ``model.init_images`` training images."""
        net.init_stitching(_calibration(data, config), max_images=config.model.init_images, progress=config.run.progress)

    # -- data
    @staticmethod
    def dataset(data: DataConfig, data_config: Any, seed: int, *, split: str | None = None,
                train: bool = True, limit: int | None = None) -> Dataset:
        """The dataset ``data`` names, read with the anchors' ``data_config``: its training split,
        augmented as ``data`` says (``train``), or another ``split`` as it is (evaluation; ``limit``).
        A limit keeps images drawn with ``seed`` (the run's), spread over the classes: the same ones on a resume."""
        from .data import build_dataset

        # limit_seed: a class-sorted folder's first N images are its first class or classes (Fashion-MNIST, stored
        # shuffled, keeps its first N)
        return build_dataset(data.source, split or data.split, data_config, augment=train and data.augment,
                             limit=data.limit if train else limit, root=data.root, download=data.download, seed=seed,
                             transform_options=data.transform_options() if train else None,
                             skip_unreadable=data.skip_unreadable, crop_padding=data.crop_padding if train else None,
                             limit_seed=seed)

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
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = f"tensors of {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise SnnetError(f"images must be float tensors, normalised as the network expects, but came as {got}: "
                             "convert them (e.g. torchvision's ToTensor and the anchors' Normalize)")
        # float64 (numpy's default) or float16 images would stop at the first layer's float32 weights
        x = x.to(next(net.parameters()).dtype)
        size = tuple(getattr(net, "input_size", ()) or ())
        if size and (x.ndim != 4 or x.shape[1] != size[0]):
            raise SnnetError(f"images of shape {tuple(x.shape[1:])} do not fit this network, which takes "
                             f"{size} (channels, height, width): use the data it was trained on")
        integer = isinstance(y, torch.Tensor) and not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool)
        if not integer or y.ndim != 1 or len(y) != len(x):
            got = f"a {tuple(y.shape)} tensor of {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise SnnetError(f"labels must be one class index (an integer) per image, but a batch of {len(x)} images "
                             f"came with {got}: give a tensor of {len(x)} integer labels")
        y = y.long()  # cross_entropy takes int64 class indices; an int32 or uint8 label tensor is as good
        classes = getattr(net, "num_classes", None)
        if isinstance(classes, int) and len(y) and (bad := _label_outside(y, classes)) is not None:
            # cross_entropy would fail with an index error (or a CUDA assert)
            raise SnnetError(f"label {bad} is outside the network's {classes} classes: "
                             "the data does not match this network's head")
        return x, y

    def check_dataset(self, net: nn.Module, dataset: Dataset, batch_size: int) -> int:
        """Fail before training if ``dataset`` cannot train ``net``; returns its size."""
        from .data import DatasetError, num_classes as dataset_classes

        n = _size(dataset, "the training dataset is empty: point --data.source/--data.root at a folder with images")
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
        item = dataset[0]
        # an item is (image, label): a dict (Hugging Face style) or a bare image would fail deep in the first step
        if not isinstance(item, (tuple, list)) or len(item) < 2 or not hasattr(item[0], "shape"):  # numpy arrays collate too
            got = type(item).__name__ + (f" of shape {tuple(item.shape)}" if hasattr(item, "shape") else "")
            raise DatasetError(f"an image-classification dataset yields (image tensor, label) pairs; its first item "
                               f"is a {got}: wrap it to return (image, label)")
        x = item[0]
        self.input_size = tuple(x.shape)
        if size and tuple(x.shape) != size:
            raise DatasetError(
                f"the dataset's images are {tuple(x.shape)} but the network takes {size}; "
                "build the dataset with the anchors' data config (net.anchors[0].data_config)")
        if n < batch_size:
            raise DatasetError(f"the dataset has {n} images, fewer than one batch of {batch_size}: lower "
                               "--data.batch_size")
        return n



class CausalLM:
    """Next-token prediction on text for a :class:`~snnet.families.causal_lm.StitchedLM` (see the module docstring).

    ``data`` gives the corpus, the block length and the held-out share, and the label smoothing of
    the targets; ``net`` the tokenizer the corpus is read with and the vocabulary (the shared
    tokenizer's ids: padded rows of an embedding matrix are never targets).
    """

    name = "causal-lm"

    def __init__(self, data: DataConfig = DataConfig(), net: "nn.Module | None" = None) -> None:
        if data.mixing:
            raise ConfigError("data.mixup and data.cutmix mix images; a causal-lm run has none: set them to 0")
        self.label_smoothing = data.label_smoothing
        self.tokenizer = getattr(net, "tokenizer", None)
        self.vocab_size = getattr(net, "vocab_size", None)

    # -- the network
    @staticmethod
    def build_network(config: TrainConfig) -> "StitchedBase":
        """The stitched language model ``config.model`` and ``config.space`` name (its FLOPs at ``data.block_size``)."""
        from .families.causal_lm import lm_network_from_config

        return lm_network_from_config(config.model, config.space, config.data.block_size)

    # -- training
    @staticmethod
    def inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens 0..T-1, tokens 1..T)`` of a batch of ``T + 1``-token blocks: every position predicts the next."""
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 2:
            raise SnnetError("a causal-lm batch holds input_ids of shape (batch, tokens >= 2) (snnet.text.text_loader)")
        return ids[:, :-1], ids[:, 1:]

    @staticmethod
    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text is not mixed: the batch as it is."""
        return x, y

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over every position (in float32 under autocast)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), label_smoothing=self.label_smoothing)

    @staticmethod
    def distill(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
        """Token-level distillation: at every position, KL at the temperature (soft) or the teacher's top token (hard)."""
        from .distill import distill_loss

        n = student.shape[-1]  # a teacher with a padded head scores only the shared tokenizer's ids
        return distill_loss(student.flatten(0, 1).float(), teacher[..., :n].flatten(0, 1).float(), config.type,
                            config.temperature)

    @staticmethod
    def build_teacher(net: "StitchedBase | nn.Module", name: str) -> nn.Module:
        """A frozen teacher: a copy of the largest anchor (``'largest'``), or a language model by name, hub id or
        folder that shares the network's tokenizer; it maps token ids to logits over the network's vocabulary."""
        import copy

        from .distill import TeacherError

        anchors = getattr(net, "anchors", None)
        if name == "largest":
            if anchors is None:
                raise TeacherError("distill.teacher 'largest' is a stitched network's largest anchor: give this model "
                                   "a teacher module (train(..., teacher=...)) or a language model's name")
            teacher: nn.Module = copy.deepcopy(anchors[-1])
        else:
            from .families.causal_lm import split_lm
            from .families.lm_catalog import check_token_ids, load_model, resolve_lm

            spec = resolve_lm(name)
            model = load_model(spec, weights=True)
            if anchors is not None:
                check_token_ids([anchors[0].config, model.config], [getattr(net, "labels", ("network",))[0], spec.label])
            teacher = split_lm(model)
        teacher = teacher.eval().requires_grad_(False)
        CausalLM.check_teacher(teacher, net, "the largest anchor" if name == "largest" else f"teacher {name!r}")
        return teacher

    @staticmethod
    def check_teacher(teacher: nn.Module, net: nn.Module, name: str = "the teacher") -> None:
        """Refuse a teacher that shares weights with the network, or that has no logit for some of its tokens."""
        from .distill import TeacherError, teacher_logits

        if {id(p) for p in teacher.parameters()} & {id(p) for p in net.parameters()}:
            raise TeacherError(f"{name} shares weights with the network being trained: pass a frozen copy "
                               "(distill.teacher 'largest' makes one of the largest anchor)")
        vocab = getattr(net, "vocab_size", None)
        param = next(teacher.parameters(), None)
        ids = torch.zeros(1, 2, dtype=torch.long, device=param.device if param is not None else "cpu")
        out = teacher_logits(teacher, ids)
        if out.ndim != 3 or (isinstance(vocab, int) and out.shape[-1] < vocab):
            raise TeacherError(f"{name} gives logits of shape {tuple(out.shape)} for 2 tokens; the network predicts "
                               f"{vocab} token ids at every position: distil from a model with the same tokenizer")

    @staticmethod
    def fit_stitching(net: "StitchedBase", data: Dataset, config: TrainConfig) -> None:
        """The least-squares init of every stitching layer on ``model.init_images`` training blocks."""
        net.init_stitching(_calibration(data, config), max_tokens=config.model.init_images * config.data.block_size,  # type: ignore[call-arg]
                           progress=config.run.progress)

    # -- data
    def dataset(self, data: DataConfig, data_config: Any = None, seed: int | None = 0, *, split: str | None = None,
                train: bool = True, limit: int | None = None) -> Dataset:
        """Token blocks of ``data.corpus`` read with the network's tokenizer: the files of ``split`` (default
        ``data.split``: 'train', 'val' (held out) or 'all'), ``data.block_size`` predictions each, at most
        ``data.limit`` blocks (training) or ``limit`` (evaluation). A limit takes an even share of each of the
        split's files, in blocks from places spread through it, the files in an order and the places drawn with
        ``seed`` (the run's: the same blocks on a resume), spread over the corpus (None: in sorted order, the
        first files' first blocks); without one every file is read, in sorted order. ``data_config`` is not
        used: text is neither transformed nor augmented."""
        from .text import corpus_fingerprint, split_documents, stdlib_root, text_files, token_blocks

        if self.tokenizer is None:
            raise ConfigError("causal-lm reads its corpus with the network's tokenizer, and this network has none: "
                              "build it from model folders that hold one (load_tokenizers) or pass tokenizer=")
        root = stdlib_root() if data.corpus == "stdlib" else Path(data.corpus).expanduser()
        files = text_files(root, "*.py") if data.corpus == "stdlib" else text_files(root, "*")
        which = split or data.split
        if which in ("all", "train+val"):
            chosen = files
        elif which in ("train", "val", "test", "held-out"):
            train_files, held = split_documents(files, root, data.held_out)
            chosen = train_files if which == "train" else held
        else:
            raise ConfigError(f"unknown split {which!r} of a text corpus; use train, val (the held-out files) or all")
        most = data.limit if train else limit
        # the split first, then the order: a limited read of one split never reaches into the other. The files are
        # sorted by path, so without the seeded order a few blocks of the standard library were __future__.py,
        # _aix_support.py, ... asyncio/ alone, and without the share of each file one large module
        return token_blocks(chosen, self.tokenizer, data.block_size, max_blocks=most,
                            fingerprint=corpus_fingerprint(chosen, root), seed=None if most is None else seed)

    def check_dataset(self, net: nn.Module, dataset: Dataset, batch_size: int) -> int:
        """Fail before training if ``dataset`` cannot train ``net`` (token ids, block length); returns its size."""
        from .data import DatasetError

        n = _size(dataset, "the training text gave no token blocks: point --data.corpus at a folder of text files")
        item = dataset[0]
        if not isinstance(item, dict) or "input_ids" not in item:
            raise DatasetError("a causal-lm dataset yields {'input_ids': ...} token blocks (snnet.text.token_blocks)")
        ids = item["input_ids"]
        low, high = int(ids.min()), int(ids.max())
        if self.vocab_size is not None and (high >= self.vocab_size or low < 0):
            bad = low if low < 0 else high  # the id that is outside, not merely the largest
            raise DatasetError(f"token id {bad} is outside the network's {self.vocab_size}-token vocabulary: "
                               "the text was tokenised with another tokenizer")
        from .families.causal_lm import max_positions

        known = [m for m in (max_positions(getattr(p, "config", None)) for p in getattr(net, "anchors", ())) if m is not None]
        if known and len(ids) - 1 > min(known):
            raise DatasetError(f"blocks of {len(ids) - 1} tokens are longer than the {min(known)} positions an anchor "
                               f"knows: lower --data.block_size to at most {min(known)}")
        if n < batch_size:
            raise DatasetError(f"the text gives {n} blocks, fewer than one batch of {batch_size}: lower "
                               "--data.batch_size or --data.block_size, or read more text")
        return n


Task = ImageClassification | CausalLM


def _class_ids(y: Any) -> Any:
    """Integer labels as int64: cross-entropy takes no other integer type, and labels read from numpy
    arrays or other files often come as int32 or int16 (float labels, soft targets, are left as they are)."""
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype not in (torch.int64, torch.bool):
        return y.long()
    return y

def _label_outside(y: torch.Tensor, classes: int) -> int | None:
    """A class index of ``y`` (non-empty) outside ``0 .. classes - 1``, or None: two reads, the smallest and the largest."""
    low, high = int(y.min()), int(y.max())
    return low if low < 0 else high if high >= classes else None


def _size(dataset: Dataset, empty: str) -> int:
    """The number of items of a training dataset, or a one-line refusal (no length; ``empty`` when it has none)."""
    from .data import DatasetError

    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as e:
        raise DatasetError("the training dataset has no length; snnet needs a map-style dataset") from e
    if n == 0:
        raise DatasetError(empty)
    return n


def _calibration(data: Dataset, config: TrainConfig) -> Any:
    """Batches for the least-squares fit: ``model.init_images`` items of the training data, drawn with the run's seed."""
    from torch.utils.data import DataLoader

    n = config.model.init_images
    return DataLoader(data, batch_size=min(config.data.batch_size, n), shuffle=True,
                      generator=torch.Generator().manual_seed(config.run.seed), num_workers=config.data.workers)


_TASKS: dict[str, type] = {ImageClassification.name: ImageClassification, CausalLM.name: CausalLM}
assert tuple(_TASKS) == TASKS, "snnet.config.TASKS names the tasks implemented here"


def get_task(name: str, data: DataConfig = DataConfig(), net: "StitchedBase | nn.Module | None" = None) -> Task:
    """The task called ``name``, set up for ``data``'s targets and ``net``'s classes (or tokenizer)."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; use one of {', '.join(_TASKS)}")
    if name == CausalLM.name:
        return CausalLM(data, net)
    classes = getattr(net, "num_classes", None) if net is not None else None
    return ImageClassification(data, classes if isinstance(classes, int) else 1000, check_labels=isinstance(classes, int))
