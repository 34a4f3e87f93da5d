"""Datasets and data loaders.

Two kinds of data are supported:

* **Fashion-MNIST**, read straight from the four IDX files (gzipped or not) that
  the Debian package ``dataset-fashion-mnist`` installs. The whole split is held
  in memory as one ``uint8`` tensor, so there is no per-sample file I/O or PIL
  decoding; this is what makes CPU-only training of the shipped family practical.
* **Anything timm can read**: a folder in ImageFolder layout, or a timm dataset
  name such as ``torch/cifar10``, transformed with the anchors' own data config
  (input size, mean/std, interpolation, crop_pct) via ``timm.data.create_transform``.

Image folders are read in the network's channels (``L`` for a 1-channel network, ``RGB`` for
3), as ``snnet serve`` converts an upload, so a folder of grayscale PNGs feeds the shipped
1-channel family; a photo is turned upright as its EXIF orientation says, as viewers show it. An
image that cannot be read stops the run with :class:`UnreadableImageError` naming the file, or,
with ``skip_unreadable=True``, is found by a scan before the run and left out (counted in the
dataset's ``skipped``).

This module deliberately depends only on ``snnet.errors`` (and ``snnet.report``'s progress bar),
so data can be loaded without the stitching core.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import SnnetError, reason
from .sampling import WorkerLoader, mix_seed, seed_everything

__all__ = [
    "DatasetError",
    "UnreadableImageError",
    "IMAGE_MODES",
    "TRANSFORM_OPTIONS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "CROP_PADDING",
    "SPLITS",
    "VAL_SPLIT_HOW",
    "default_fashion_mnist_root",
    "validation_indices",
    "read_idx",
    "build_dataset",
    "spread_order",
    "describe_transform",
    "image_transform",
    "three_augment_transform",
    "image_mode",
    "ImageReader",
    "convert_image",
    "exif_orientation",
    "QUARTER_TURNS",
    "skipped_images",
    "num_classes",
    "check_source",
    "erasing_collate",
    "make_loader",
    "check_workers",
    "set_epoch",
    "split_batch_erasing",
]

FASHION_MNIST_MEAN: tuple[float] = (0.2860,)
FASHION_MNIST_STD: tuple[float] = (0.3530,)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_NAMES = frozenset({"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"})
_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FILE_OF_SPLIT = {"train": "train", "val": "train", "train+val": "train", "test": "test"}
# Fashion-MNIST ships a training file (60,000 images) and a test file (10,000). snnet carves a
# fixed validation split out of the training file so that choices (widths, epochs, demo steps,
# learning rates) are made without looking at the test set:
#   "train"     the training file minus the validation images (50,000)
#   "val"       a sixth of every class of the training file (10,000: 1,000 per class)
#   "train+val" the whole training file (60,000; what the shipped family was trained on)
#   "test"      the test file (10,000), to be reported once
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val",
                  "train+val": "train+val", "full-train": "train+val", "test": "test", "eval": "test"}
SPLITS = ("train", "val", "train+val", "test")
# The validation split is a pure function of the labels and this seed (see validation_indices).
VAL_SEED = 0
VAL_FRACTION = 6  # one image in six of each class
_TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")


# Arguments of timm.data.create_transform a training recipe may set (build_dataset's transform_options).
TRANSFORM_OPTIONS = ("auto_augment", "re_prob", "re_mode", "re_count", "color_jitter", "interpolation", "scale", "ratio",
                     "hflip", "vflip", "three_augment")


class DatasetError(SnnetError):
    """A dataset is missing, empty or corrupt. The message says how to fix it."""


class UnreadableImageError(DatasetError):
    """One image file of a folder dataset cannot be opened or decoded; ``path`` names it.

    Training catches it to checkpoint before exiting; the message says how to go on (replace the
    file, or skip unreadable images). Raised in a loader worker, torch re-creates it in the main
    process from its message alone, so ``path`` is recovered from the message's fixed form.
    """

    _FORM = ": unreadable image ("

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        text = str(self)  # the one line (SnnetError recovers it from a worker's traceback text)
        self.path = Path(path) if path is not None else (
            Path(text.split(self._FORM, 1)[0]) if self._FORM in text else None)

    @classmethod
    def of(cls, path: str | os.PathLike[str], reason: str) -> "UnreadableImageError":
        return cls(f"{path}{cls._FORM}{reason}); replace or delete the file, or leave unreadable images out "
                   "(`snnet eval --skip-bad-images`, build_dataset(..., skip_unreadable=True))", path)


def _how_to_get_fashion_mnist(root: Path) -> str:
    # one line, and each option named with the commands that have it
    return (
        f"Fashion-MNIST was not found in {root}: `apt-get install dataset-fashion-mnist` (installs to {_DEBIAN_ROOT}), "
        "or give a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (optionally .gz) as `--data.root DIR` (snnet train, snnet demo; `--data-dir DIR` for "
        "snnet stitches) or env SNNET_FASHION_MNIST=DIR (every command); `snnet train/demo --data.download true` "
        "(download=True in Python) fetches it with torchvision"
    )


def default_fashion_mnist_root() -> Path:
    """Where Fashion-MNIST is looked for when no folder is given.

    ``$SNNET_FASHION_MNIST`` wins; otherwise the Debian package's folder if it
    exists, else the user cache (which is also where ``download=True`` puts it).
    """
    env = os.environ.get("SNNET_FASHION_MNIST")
    if env:
        return Path(env).expanduser()
    if _DEBIAN_ROOT.is_dir():
        return _DEBIAN_ROOT
    return Path("~/.cache/snnet/fashion-mnist").expanduser()


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> torch.Tensor:
    """Read one IDX file (optionally gzipped) into a tensor with torchvision's reader, the one its
    MNIST datasets use, and refuse in one line a file it cannot read.

    torchvision reads plain files only, so a gzipped one is decompressed to a temporary file first;
    its strict check that the payload fills the header's shape catches a truncated download, the
    common failure.
    """
    import tempfile
    import zlib

    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    path = Path(path)
    try:
        with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
            if path.suffix == ".gz":
                tmp.write(gzip.decompress(path.read_bytes()))
                tmp.flush()
            out = read_sn3_pascalvincent_tensor(tmp.name if path.suffix == ".gz" else str(path), strict=True)
    except PermissionError as e:  # the file may be whole: deleting it, as the message below says, would lose it
        raise DatasetError(f"cannot read IDX file {path}: permission denied; make it readable (chmod u+r "
                           f"'{path}')") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a damaged body a zlib.error
        raise DatasetError(f"cannot read IDX file {path}: {e}; delete it and re-fetch it") from e
    except (AssertionError, KeyError, RuntimeError, ValueError, IndexError) as e:  # what torchvision's parser raises
        raise DatasetError(f"{path} is not a whole IDX file (bad magic number, or truncated or corrupt); "
                           "delete it and re-fetch it") from e
    if expected_ndim is not None and out.ndim != expected_ndim:
        raise DatasetError(f"{path}: expected a {expected_ndim}-d IDX file, header says {out.ndim}-d")
    return out


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def _download_fashion_mnist(root: Path) -> None:
    """Fetch the IDX files with torchvision's downloader and copy them flat into ``root``."""
    from torchvision.datasets import FashionMNIST as TVFashionMNIST

    try:
        # torchvision keeps them under <root>/FashionMNIST/raw/
        TVFashionMNIST(str(root), train=True, download=True)
        TVFashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, RuntimeError)
        raise DatasetError(f"downloading Fashion-MNIST into {root} failed: {e}; "
                           + _how_to_get_fashion_mnist(root)) from e
    raw = root / "FashionMNIST" / "raw"
    for stems in _FILES.values():
        for stem in stems:
            src = _find_idx(raw, stem)
            if src is not None and _find_idx(root, stem) is None:
                shutil.copyfile(src, root / src.name)


VAL_SPLIT_HOW = (f"stratified: one image in {VAL_FRACTION} of each class of the 60,000 training images (1,000 of "
                 f"6,000), those whose blake2b digest of '{VAL_SEED}:<index in the IDX file>' sorts first")


def validation_indices(labels: torch.Tensor, seed: int = VAL_SEED) -> torch.Tensor:
    """Indices (ascending) of the validation images among the training file's ``labels``.

    Stratified: each class gives ``round(n_c / 6)`` images, those whose blake2b digest of
    ``"<seed>:<index>"`` sorts first. A hash rather than a random generator makes the split a
    pure function of the data and the seed, the same on every machine and every torch version.
    """
    import hashlib

    chosen: list[int] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten().tolist()
        members.sort(key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
        chosen += members[:round(len(members) / VAL_FRACTION)]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _select_split(split: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the training file that belong to ``split`` (original order kept)."""
    if split in ("train+val", "test"):
        return images, labels
    val = validation_indices(labels)
    if split == "val":
        return images[val], labels[val]
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[val] = False
    return images[keep], labels[keep]


CROP_PADDING = 2
"""Fashion-MNIST's random crop, by default: a 28x28 crop of the image zero-padded by 2 pixels (shifts of up to 2)."""


@dataclass(frozen=True)
class _Augment:
    """Train-time augmentation: random crop from a zero-padded image (``padding`` 0: none) + horizontal flip."""

    padding: int = CROP_PADDING
    hflip: float = 0.5


class FashionMNIST(Dataset[tuple[torch.Tensor, int]]):
    """Fashion-MNIST from IDX files, entirely in memory.

    Items are ``(image, label)`` with ``image`` a float tensor ``1x28x28``
    normalized with ``mean``/``std`` and ``label`` an int in ``[0, 10)``. Passing a
    3-value ``mean``/``std`` (an RGB anchor's data config) yields ``3x28x28`` images
    with the gray channel repeated.

    Augmentation parameters (crop offsets, flips) are drawn for the whole split
    at once in :meth:`set_epoch` from a generator seeded with ``(seed, epoch)``,
    so an epoch's augmentations do not depend on the number of loader workers or
    on iteration order: the same seed and epoch always give the same images.
    Item ``(i, c)`` is the ``c``-th copy of image ``i`` under repeated augmentation
    (``snnet.sampling.EpochSampler``'s ``distinct_copies``): copy 0 is item ``i``,
    each other copy is cropped and flipped by a draw for the whole split seeded
    with ``(seed, epoch, c)``.
    """

    num_classes = 10
    classes = FASHION_MNIST_CLASSES
    # __getitem__ draws no random numbers (set_epoch does): training need not seed each item
    deterministic_items = True
    # item (i, c): copy c of image i, with a crop and flip of its own (repeated augmentation)
    distinct_copies = True

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        *,
        mean: tuple[float, ...] = FASHION_MNIST_MEAN,
        std: tuple[float, ...] = FASHION_MNIST_STD,
        limit: int | None = None,
        augment: bool = False,
        crop_padding: int = CROP_PADDING,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        if crop_padding < 0:
            raise DatasetError(f"Fashion-MNIST's crop padding must be >= 0 pixels (0: flips only), got {crop_padding}")
        self.split = _fashion_mnist_split(split)
        self.root = Path(root).expanduser() if root is not None else default_fashion_mnist_root()
        _check_limit(limit)
        if download and _fashion_mnist_missing(self.root, self.split):
            self.root.mkdir(parents=True, exist_ok=True)
            _download_fashion_mnist(self.root)
        paths = _locate_fashion_mnist(self.root, self.split)
        images = read_idx(paths[0], expected_ndim=3)
        labels = read_idx(paths[1], expected_ndim=1)
        if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
            raise DatasetError(
                f"{paths[0]} / {paths[1]}: {tuple(images.shape)} images do not match "
                f"{tuple(labels.shape)} labels of 28x28 Fashion-MNIST; re-fetch the files"
            )
        if images.dtype != torch.uint8:  # pixels are normalised from 0-255: floats in [0, 1] would all be black
            raise DatasetError(f"{paths[0]}: IDX pixels of type {str(images.dtype).removeprefix('torch.')}, "
                               "Fashion-MNIST's are unsigned bytes 0-255 (IDX type 0x08); re-fetch the file or "
                               "write it as bytes")
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise DatasetError(f"{paths[1]}: label {int(labels.max())} is out of range [0, 10)")
        images, labels = _select_split(self.split, images, labels)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = images.unsqueeze(1).contiguous()  # N x 1 x 28 x 28, uint8
        self.labels = labels.long()
        self.mean, self.std = tuple(mean), tuple(std)
        # Folding 1/255 into the normalization lets __getitem__ do one fused affine op.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
        self.augment = _Augment(padding=crop_padding) if augment else None
        self.seed = seed
        if self.augment is not None:
            p = self.augment.padding
            # Pad once up front: a random crop is then just a slice of the padded image.
            self._padded = torch.nn.functional.pad(self.images, (p, p, p, p))
            self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentation parameters (no-op without augmentation)."""
        if self.augment is None:
            return
        self._epoch = epoch
        # copy 0's draws; the other copies' are drawn when first read (_draws), the sampler alone knows how many
        self._copies = {0: self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}

    def _draw(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (N x 2) and flips (N) for every image of the split, from ``g``."""
        assert self.augment is not None
        n = len(self)
        offsets = torch.randint(0, 2 * self.augment.padding + 1, (n, 2), generator=g)
        return offsets, torch.rand(n, generator=g) < self.augment.hflip

    def _draws(self, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop offsets and flips of every image's ``copy``-th copy: a pure function of
        (seed, epoch, copy), whichever worker reads it first."""
        if copy not in self._copies:
            self._copies[copy] = self._draw(torch.Generator().manual_seed(mix_seed(self.seed, self._epoch, copy)))
        return self._copies[copy]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, copy = index if isinstance(index, tuple) else (index, 0)
        if self.augment is None:
            image = self.images[index]  # past the end: IndexError, which ends iterating the dataset directly
        else:
            offsets, flips = self._draws(copy)
            dy, dx = offsets[index].tolist()
            image = self._padded[index, :, dy:dy + 28, dx:dx + 28]
            if flips[index]:
                image = image.flip(-1)
        return image.float() * self._scale - self._shift, int(self.labels[index])

    def __repr__(self) -> str:
        augment = "none" if self.augment is None else ("flip" if self.augment.padding == 0 else
                                                       f"crop{self.augment.padding}+flip")
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root='{self.root}', augment={augment})"


def _fashion_mnist_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; use one of {', '.join(SPLITS)}")
    return _SPLIT_ALIASES[split]


def _fashion_mnist_missing(root: Path, split: str) -> list[str]:
    return [stem for stem in _FILES[_FILE_OF_SPLIT[split]] if _find_idx(root, stem) is None]


def _locate_fashion_mnist(root: Path, split: str) -> list[Path]:
    """The split's image and label files in ``root``, or a DatasetError saying how to get them."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: give the folder that holds Fashion-MNIST's four IDX files")
    missing = _fashion_mnist_missing(root, split)
    if missing:
        raise DatasetError(f"missing {', '.join(missing)}[.gz]. " + _how_to_get_fashion_mnist(root))
    return [_find_idx(root, stem) for stem in _FILES[_FILE_OF_SPLIT[split]]]  # type: ignore[misc]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DatasetError(f"a dataset limit must be >= 1 image, got {limit}")


def _missing_folder(path: Path) -> DatasetError:
    what = f"{path} is a file, not a dataset" if path.is_file() else f"dataset folder {path} does not exist"
    return DatasetError(f"{what} (expected an ImageFolder tree, 'fashion-mnist', or a timm dataset name such as "
                        "'torch/cifar10')")


def check_source(name_or_path: str | os.PathLike[str], split: str = "train",
                 root: str | os.PathLike[str] | None = None) -> None:
    """Fail fast — before any model is built — if a dataset is plainly not there (nothing is read or downloaded)."""
    name = _dataset_name(name_or_path)
    if name.lower() in FASHION_MNIST_NAMES:
        _locate_fashion_mnist(Path(root).expanduser() if root is not None else default_fashion_mnist_root(),
                              _fashion_mnist_split(split))
    elif Path(name).expanduser().is_file() or not (_is_timm_name(name, root) or Path(name).expanduser().is_dir()):
        raise _missing_folder(Path(name).expanduser())
    else:
        if not Path(name).expanduser().is_dir():
            _check_timm_root(name, root)
        _is_train(split)  # an unknown split name fails now too


def _dataset_name(name_or_path: str | os.PathLike[str]) -> str:
    """The dataset's name, refused if empty: Path('') is the current folder, which was read as an image folder
    (an unset variable in `--data "$DATA"`)."""
    name = str(name_or_path)
    if not name.strip():
        raise DatasetError("the dataset name is empty: give 'fashion-mnist', an image folder (. for this one) or a "
                           "timm dataset name such as 'torch/cifar10'")
    return name


def _is_timm_name(name: str, root: str | os.PathLike[str] | None = None) -> bool:
    """A name timm's create_dataset may know (``torch/cifar10``, ``imagenet``), rather than a path.

    timm reads a name without one of its prefixes (``imagenet``) from the folder or ``.tar`` at ``root``:
    without a root such a name is a folder that does not exist (a typo), not a dataset timm can open."""
    if name.startswith(_TIMM_PREFIXES):
        return True
    return root is not None and os.sep not in name and "/" not in name and not Path(name).exists()


def _check_timm_root(name: str, root: str | os.PathLike[str] | None) -> None:
    """Refuse a name without a timm prefix whose ``root`` (where timm reads it from) does not exist: timm's
    own check is a bare ``assert``, which says nothing."""
    if not name.startswith(_TIMM_PREFIXES) and root is not None and not Path(root).expanduser().exists():
        raise DatasetError(f"dataset {name!r} is read from its root folder {root}, which does not exist: give the "
                           "folder (or .tar) that holds it, or a timm dataset name such as 'torch/cifar10'")


def _is_train(split: str) -> bool:
    """Whether a split name means training data, for datasets other than Fashion-MNIST (which
    have their own train/validation folders or splits and no carved validation split)."""
    if split not in _SPLIT_ALIASES:
        raise DatasetError(f"unknown split {split!r}; use train, val or test (an image folder's train/, val/ or test/ "
                           "sub-folder if it has them, else the folder itself)")
    return _SPLIT_ALIASES[split] in ("train", "train+val")


def _image_folder_root(root: Path, split: str) -> Path:
    """Pick ``root/train``, ``root/val`` or ``root/test`` (and synonyms) as ``split`` asks if present, else
    the other held-out folder (a test split reads ``val/`` when there is no ``test/``, and back), else ``root``;
    a held-out split of a folder that has only ``train/`` is refused."""
    if _is_train(split):
        names: tuple[str, ...] = ("train", "training")
    elif _SPLIT_ALIASES[split] == "test":
        names = ("test", "eval", "val", "validation")
    else:
        names = ("val", "validation", "test", "eval")
    for name in names:
        if (root / name).is_dir():
            return root / name
    present = [f"{name}/" for name in _SPLIT_FOLDERS if (root / name).is_dir()]
    # root itself would be read with its split folders as the classes: a held-out split would be the training
    # images, all of class 'train' (a training split still reads it: calibration images need no labels)
    if present and not _is_train(split):
        raise DatasetError(f"{root} has {', '.join(present)} but no folder for the {split!r} split "
                           f"({' or '.join(n + '/' for n in names)}): add it, or ask for a split the folder has")
    return root


# the sub-folders of an image folder that hold a split (_image_folder_root), not a class
_SPLIT_FOLDERS = tuple(name for name, split in _SPLIT_ALIASES.items() if split != "train+val")


# PIL mode an image is converted to for a network of this many input channels (and the server's uploads)
IMAGE_MODES: dict[int, str] = {1: "L", 3: "RGB"}


def image_mode(data_config: Mapping[str, Any] | None) -> str:
    """The PIL mode images are read in for a data config's ``input_size`` (RGB without one)."""
    size = (data_config or {}).get("input_size")
    channels = int(size[0]) if size else 3
    if channels not in IMAGE_MODES:
        raise DatasetError(f"the network takes {channels}-channel images; image files can feed 1 (grayscale) or "
                           "3 (RGB) channels: give a dataset of tensors instead")
    return IMAGE_MODES[channels]


@dataclass(frozen=True)
class ImageReader:
    """Open an image file fully decoded and converted to ``mode`` (``L`` or ``RGB``), or raise
    :class:`UnreadableImageError` naming it. A plain picklable object, so loader workers get it."""

    mode: str = "RGB"

    def __call__(self, path: str | os.PathLike[str]) -> Any:
        try:
            return self.open(path)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError...)
            raise UnreadableImageError.of(path, reason(e)) from e

    def open(self, path: str | os.PathLike[str]) -> Any:
        """The image, or whatever exception opening or decoding it raises."""
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # truncated or corrupt data fails here, not later inside the transform
        return convert_image(img, self.mode)


# Pillow's modes of 16-bit grayscale (PNG, TIFF; "I": a 16-bit PGM, which Pillow scales to 0-65535 whatever its
# maxval): converted to "L" it clips every value above 255
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# where Pillow keeps the metadata an orientation can be in (JPEG/PNG EXIF, a PNG's old text EXIF, XMP): an image
# with none of them (a PNG as Pillow, numpy or torchvision write it) is upright without parsing anything
_ORIENTATION_INFO = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")
# EXIF orientations that turn the stored image a quarter (a phone held upright writes 6): width and height swap
QUARTER_TURNS = frozenset({5, 6, 7, 8})


def exif_orientation(img: Any) -> int:
    """The EXIF Orientation (1-8) of an opened PIL image, 1 (as stored) without one. Read from the header, so
    known before decoding; a damaged EXIF block counts as none (the pixels are still the picture)."""
    if not any(key in img.info for key in _ORIENTATION_INFO):
        return 1
    from PIL import ExifTags

    try:
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises several types for a broken block
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def convert_image(img: Any, mode: str) -> Any:
    """A decoded PIL image in ``mode`` (``L`` or ``RGB``), as :class:`ImageReader` reads files and as an
    uploaded image should be read: turned upright as its EXIF orientation says (a phone photo is stored
    sideways with Orientation 6, as browsers and viewers show it), RGBA/P/CMYK/LA converted by Pillow, 16-bit
    grayscale scaled to 8 bits (Pillow would clip it, turning most of a 16-bit image white)."""
    from PIL import Image, ImageOps

    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)  # a new image: the caller's is left as it is
    if img.mode in _SIXTEEN_BIT:
        import numpy as np

        # "I" holds 32-bit integers: values outside 16 bits are clipped rather than wrapped around
        pixels = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((pixels * 255 // 65535).astype(np.uint8), mode="L")
    return img.convert(mode) if img.mode != mode else img


def image_transform(data_config: Mapping[str, Any], augment: bool = False,
                    options: Mapping[str, Any] | None = None) -> Any:
    """timm's transform from a PIL image to a normalised tensor for a data config (``input_size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``): what folders and named
    datasets are read with here, and what ``snnet serve`` applies to an uploaded image.
    ``options`` (RandAugment, random erasing...: :data:`TRANSFORM_OPTIONS`) apply when ``augment``."""
    from timm.data import create_transform

    if augment and options and options.get("three_augment"):
        return three_augment_transform(data_config, options)
    args = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
            if k in data_config}
    if augment and options:
        args.update(options)
    try:
        return create_transform(**args, is_training=augment)
    except (ValueError, AssertionError, KeyError, TypeError) as e:  # e.g. a malformed RandAugment string
        raise DatasetError(f"timm cannot build the training transform from {dict(options or {})}: {e}") from e


class _RandomBlur:
    """A PIL Gaussian blur of radius drawn uniformly from [0.1, 2] (DeiT III's 3-Augment; Python's ``random``)."""

    def __call__(self, img: Any) -> Any:
        import random

        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def three_augment_transform(data_config: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    """DeiT III's 3-Augment with simple random crop, as SN-Netv2 trains (``--ThreeAugment --src``): resize the
    shorter side to the input size (bicubic unless ``options['interpolation']``), a random crop of it from the
    image padded by 4 reflected pixels, a horizontal flip; then one of greyscale, solarisation or a Gaussian
    blur, chosen at random; colour jitter ``options['color_jitter']`` (0: none); the anchors' mean/std."""
    from torchvision import transforms as T
    from timm.data.transforms import str_to_interp_mode

    channels, size = int(data_config["input_size"][0]), tuple(data_config["input_size"][1:])
    jitter = float(options.get("color_jitter", 0.0) or 0.0)
    interpolation = options.get("interpolation") or "bicubic"
    try:
        resize_mode = str_to_interp_mode(interpolation)
    except KeyError as e:  # timm's table of names ('random' is not in it: one resize of the short side)
        raise DatasetError(f"3-Augment cannot resize with interpolation {interpolation!r}: give bicubic (its default), "
                           "bilinear, nearest, box, hamming or lanczos") from e
    steps = [T.Resize(size[0], interpolation=resize_mode),
             T.RandomCrop(size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
             T.RandomChoice([T.Grayscale(channels), T.RandomSolarize(128, p=1.0), _RandomBlur()])]
    if jitter > 0:
        steps.append(T.ColorJitter(jitter, jitter, jitter))
    steps += [T.ToTensor(), T.Normalize(data_config.get("mean", (0.5,) * channels), data_config.get("std", (0.5,) * channels))]
    return T.Compose(steps)


def describe_transform(dataset: Dataset) -> str:
    """What an evaluation dataset does to an image before the network sees it, in words (resize,
    crop, interpolation, mean/std): what a results file records beside the accuracy it gave."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, FashionMNIST):
        return (f"none ({'x'.join(map(str, dataset.images.shape[-2:]))} as stored), "
                f"mean {_numbers(dataset.mean)}, std {_numbers(dataset.std)}")
    transform = getattr(dataset, "transform", None)
    if transform is None:
        return "none"
    parts = []
    for t in getattr(transform, "transforms", [transform]):
        size, mode = getattr(t, "size", None), getattr(t, "interpolation", None)
        if mode is not None and size is not None:  # torchvision's Resize: an int is the shorter side
            side = f"shorter side to {size}" if isinstance(size, int) else f"to {'x'.join(map(str, size))}"
            parts.append(f"resize {side} ({getattr(mode, 'value', mode)})")
        elif type(t).__name__ == "CenterCrop":
            parts.append(f"centre crop {'x'.join(map(str, t.size))}")
        elif type(t).__name__ == "Normalize":
            parts.append(f"mean {_numbers(t.mean)}, std {_numbers(t.std)}")
        elif type(t).__name__ not in ("ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor"):
            parts.append(type(t).__name__)
    return ", ".join(parts) or "none"


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def build_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    data_config: Mapping[str, Any] | None = None,
    *,
    augment: bool = False,
    limit: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    transform_options: Mapping[str, Any] | None = None,
    skip_unreadable: bool = False,
    crop_padding: int | None = None,
    limit_seed: int | None = None,
) -> Dataset:
    """Build a dataset by name or path.

    Args:
        name_or_path: ``'fashion-mnist'`` (aliases ``fmnist``, ``fashion_mnist``); a
            folder in ImageFolder layout (``root/train/<class>/*``, ``root/val/<class>/*``
            or just ``root/<class>/*``); or any other ``timm.data.create_dataset`` name,
            e.g. ``'torch/cifar10'`` (then ``root`` is where it lives / is downloaded to).
        split: for Fashion-MNIST one of :data:`SPLITS` (``'train'``: 50,000 images, ``'val'``:
            the 10,000 carved from the training file, ``'train+val'``: all 60,000, ``'test'``);
            for folders and other datasets ``'train'`` or ``'val'``/``'test'``.
        data_config: the anchors' data config from ``timm.data.resolve_data_config``
            (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``...). For
            Fashion-MNIST only ``mean``/``std`` are used.
        augment: apply train-time augmentation (timm's training transform for
            folders and named datasets; crop+flip for Fashion-MNIST).
        limit: keep only the first ``limit`` samples (quick modes, tests); see ``limit_seed``.
        root: data folder for Fashion-MNIST / named datasets.
        download: allow downloading when the data is not on disk.
        seed: seed of the Fashion-MNIST augmentation.
        transform_options: more arguments of ``timm.data.create_transform`` for the training
            transform (``augment=True``): ``auto_augment`` (RandAugment, e.g.
            ``'rand-m9-mstd0.5-inc1'``), ``re_prob``/``re_mode``/``re_count`` (random erasing),
            ``color_jitter``, ``interpolation``, ``scale``, ``ratio``, ``hflip``, ``vflip``.
        skip_unreadable: for a folder, decode every image first (the first ``limit`` good ones with
            ``limit``) and leave out those that cannot be read; :func:`skipped_images` lists them.
            Without it, an unreadable image raises :class:`UnreadableImageError` when it is read.
        crop_padding: Fashion-MNIST's random crop with ``augment``: pixels of zero padding
            (0: flips only; None: :data:`CROP_PADDING`). Other datasets refuse it (timm's transform).
        limit_seed: with ``limit``, keep the first ``limit`` samples of a permutation seeded with it
            (:func:`spread_order`) instead of the first ones: calibration and ``--limit`` subsets, spread
            over the classes of a folder that lists them one after another (the same samples for the same
            seed). Fashion-MNIST keeps its first ``limit`` either way: its files are stored shuffled.

    Raises:
        DatasetError: the dataset is missing or empty, or the transform options are not usable;
            :class:`UnreadableImageError` when an image of a folder cannot be read.
    """
    config = dict(data_config or {})
    options = dict(transform_options or {})
    unknown = sorted(set(options) - set(TRANSFORM_OPTIONS))
    if unknown:
        raise DatasetError(f"unknown transform option(s) {', '.join(unknown)}; use {', '.join(TRANSFORM_OPTIONS)}")
    name = _dataset_name(name_or_path)
    _check_limit(limit)
    path = Path(name).expanduser()
    if skip_unreadable and not path.is_dir():
        raise DatasetError(f"skipping unreadable images (--skip-bad-images) applies to image folders; {name} is not one")
    if name.lower() in FASHION_MNIST_NAMES:
        if options and augment:
            raise DatasetError(f"Fashion-MNIST is augmented by its own crop and flip, not timm's transform: drop "
                               f"{', '.join(sorted(options))} (e.g. --set auto_augment=none --set re_prob=0) or use "
                               "an ImageFolder / timm dataset")
        stats = {k: tuple(config[k]) for k in ("mean", "std") if k in config}
        padding = CROP_PADDING if crop_padding is None else crop_padding
        return FashionMNIST(root, split, limit=limit, augment=augment, crop_padding=padding, seed=seed,
                            download=download, **stats)
    if crop_padding is not None:
        raise DatasetError(f"crop padding {crop_padding} is Fashion-MNIST's own crop; {name} is augmented by timm's "
                           "transform: drop it (--data.crop_padding null)")

    from timm.data import create_dataset

    transform = image_transform(config, augment, options)
    if path.is_dir():
        dataset: Dataset = _image_folder(_image_folder_root(path, split), transform, image_mode(config),
                                         skip_unreadable, limit, limit_seed)
    elif _is_timm_name(name, root):
        _check_timm_root(name, root)
        dataset = _timm_dataset(create_dataset, name, root, split, augment, download, transform)
    else:
        raise _missing_folder(path)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DatasetError(f"dataset {name} ({split}) is empty")
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        # a folder's samples are in spread order already (_image_folder): its first `limit` are the spread ones
        spread = limit_seed is not None and not path.is_dir()
        dataset = Subset(dataset, spread_order(len(dataset), limit_seed)[:limit] if spread else range(limit))  # type: ignore[arg-type]
    return dataset


def spread_order(size: int, seed: int) -> list[int]:
    """``range(size)`` in an order that is a pure function of ``seed``: its first ``n`` are ``n`` samples spread
    over the whole dataset, where the first ``n`` of an image folder (its classes one after another) are all of
    its first class."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


# a folder this big shows a progress bar while its images are checked (smaller ones take under a second)
_CHECK_PROGRESS_FROM = 1000


def _image_folder(folder: Path, transform: Any, mode: str, skip_unreadable: bool, limit: int | None,
                  limit_seed: int | None = None) -> Dataset:
    """torchvision's ImageFolder reading images with :class:`ImageReader` (the network's channels), after
    checking that every class folder can be listed; with ``limit`` and ``limit_seed`` its samples in
    :func:`spread_order`; with ``skip_unreadable`` the unreadable images are found first (in that order,
    until ``limit`` good ones) and left out."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    _check_class_folders(folder)
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=ImageReader(mode))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / a class without images
        raise DatasetError(f"{folder} is not a usable ImageFolder dataset: {reason(e).partition(': ')[2]}; "
                           f"expected {folder}/<class name>/<image files> ({', '.join(IMG_EXTENSIONS)}), "
                           "every class folder with at least one image") from e
    _check_no_folder_twice(dataset.samples)
    if limit is not None and limit_seed is not None:  # before the scan: only the images kept are decoded
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in spread_order(len(dataset.samples), limit_seed)]
        dataset.targets = [t for _, t in dataset.samples]
    dataset.skipped = ()  # type: ignore[attr-defined]
    if skip_unreadable:
        _drop_unreadable(dataset, limit)
    return dataset


def _check_class_folders(folder: Path) -> None:
    """Refuse a class folder that cannot be listed (torchvision would say it holds no valid file)."""
    try:
        classes = [e for e in os.scandir(folder) if e.is_dir()]
    except OSError as e:
        raise DatasetError(f"cannot list {folder} ({e.strerror or e}): make it readable (chmod u+rx)") from e
    for entry in classes:
        try:
            with os.scandir(entry.path):  # opening the listing is the test: its files are read later, one by one
                pass
        except OSError as e:
            raise DatasetError(f"class folder {entry.path} cannot be read ({e.strerror or e}): make it readable "
                               f"(chmod -R u+rX '{entry.path}') or move it out of {folder}; skipping it would "
                               "renumber the classes after it") from e


def _check_no_folder_twice(samples: list[tuple[str, int]]) -> None:
    """Refuse a tree that reaches one folder by two paths (a symbolic link back into it): torchvision follows
    links, so its images would be read, trained on and counted several times."""
    seen: dict[str, str] = {}
    for folder in dict.fromkeys(os.path.dirname(path) for path, _ in samples):
        real = os.path.realpath(folder)
        if real in seen:
            raise DatasetError(f"{folder} is {seen[real]} again (reached through a symbolic link): its images would "
                               "count more than once; remove the link or copy the images")
        seen[real] = folder


def _drop_unreadable(dataset: Any, limit: int | None) -> None:
    """Decode the images of an ImageFolder in order (until ``limit`` readable ones) and remove the
    unreadable ones from it; they are kept, with the reason, in its ``skipped``."""
    from concurrent.futures import ThreadPoolExecutor

    from .report import progress

    reader: ImageReader = dataset.loader
    wanted = len(dataset.samples) if limit is None else min(limit, len(dataset.samples))

    def check(sample: tuple[str, int]) -> str | None:
        try:
            reader.open(sample[0])
        except Exception as e:  # noqa: BLE001 - as ImageReader: whatever Pillow raises
            return reason(e)
        return None

    good: list[tuple[str, int]] = []
    bad: list[tuple[str, str]] = []
    samples, seen, chunk = dataset.samples, 0, 64
    # Pillow decodes without holding the GIL: threads read several files at once
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            progress(wanted, "checking images", "img", enabled=wanted >= _CHECK_PROGRESS_FROM) as bar:
        while seen < len(samples) and len(good) < wanted:
            batch = samples[seen:seen + chunk]
            for sample, why in zip(batch, pool.map(check, batch)):
                if len(good) == wanted:
                    break
                seen += 1
                if why is None:
                    good.append(sample)
                    bar.update(1)
                else:
                    bad.append((sample[0], why))
    if not good:
        raise DatasetError(f"none of the images of {dataset.root} can be read (first: {bad[0][0]}: {bad[0][1]})")
    dataset.samples = dataset.imgs = good + samples[seen:]
    dataset.targets = [t for _, t in dataset.samples]
    dataset.skipped = tuple(bad)


def skipped_images(dataset: Dataset) -> tuple[tuple[str, str], ...]:
    """The ``(file, reason)`` of every image a folder dataset left out as unreadable (``skip_unreadable``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return tuple(getattr(dataset, "skipped", ()))


def _timm_dataset(create_dataset: Any, name: str, root: str | os.PathLike[str] | None, split: str,
                  augment: bool, download: bool, transform: Any) -> Dataset:
    timm_split = "train" if _is_train(split) else "validation"
    if root is None and name.lower().startswith("torch/"):  # torchvision's datasets take no root of None (TypeError)
        raise DatasetError(f"dataset {name!r} is read from (or downloaded to) a folder: give it as --data.root DIR "
                           "(snnet train) or root= in Python")
    try:
        return create_dataset(name, root=str(root) if root is not None else None, split=timm_split,
                              is_training=augment, download=download, transform=transform)
    except ImportError as e:  # hfds/ needs `datasets`, tfds/ `tensorflow_datasets`, wds/ `webdataset`
        raise DatasetError(f"dataset {name!r} needs the Python package {e.name or reason(e)!s}, which is not "
                           f"installed: pip install {(e.name or '').replace('_', '-') or 'it'}") from e
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError, TypeError) as e:
        hint = "" if download else " (download=True in Python fetches it, if it can be downloaded)"
        raise DatasetError(f"cannot open dataset {name!r} (root={root}, split={timm_split}): {reason(e)}{hint}") from e


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset built by :func:`build_dataset` (``Subset`` is unwrapped)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    n = getattr(dataset, "num_classes", None)
    if isinstance(n, int):
        return n
    for holder in (dataset, getattr(dataset, "reader", None)):
        if holder is None:
            continue
        classes = getattr(holder, "classes", None) or getattr(holder, "class_to_idx", None)
        if classes:
            return len(classes)
    raise DatasetError(f"cannot tell the number of classes of {type(dataset).__name__}")


def split_batch_erasing(re_prob: float, re_mode: str = "pixel", re_count: int = 1, splits: int = 2,
                        device: str | torch.device = "cpu") -> Any:
    """Random erasing of a normalised batch that leaves its first ``1/splits`` of images clean.

    This is how the reference's ResNet and ResNet->Swin runs erase (timm's loader with ``--resplit``:
    its prefetcher erases each image of the rest of the batch with probability ``re_prob``, after
    normalisation, and the clean half is what split batch norm's main statistics see); a per-image
    transform with ``re_prob`` erases every image instead. timm's own ``RandomErasing`` in batch mode;
    build the training transform without erasing and call the result on each batch (or collate with
    :func:`erasing_collate`). Draws from Python's ``random``, as timm does.
    """
    from timm.data.random_erasing import RandomErasing

    if not 0.0 <= re_prob <= 1.0 or splits < 1 or re_count < 1:
        raise DatasetError(f"split-batch erasing needs 0 <= re_prob <= 1, splits >= 1 and re_count >= 1; got "
                           f"{re_prob}, {splits}, {re_count}")
    return RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count, num_splits=splits, device=str(device))


def erasing_collate(erase: Any) -> Any:
    """A DataLoader ``collate_fn``: PyTorch's default collation, then ``erase`` (e.g. :func:`split_batch_erasing`)
    on the batch's images, in place."""
    from torch.utils.data import default_collate

    def collate(items: list[Any]) -> Any:
        batch = default_collate(items)
        erase(batch[0])
        return batch

    return collate


# loader worker processes per CPU beyond which more only cost memory and start-up time (reading files
# from a slow disk can use more than one per CPU; a hundred thousand is a typo that forks until memory ends)
WORKERS_PER_CPU = 4


def check_workers(num_workers: int) -> int:
    """``num_workers`` if it is a sane number of loader processes for this machine, else a DatasetError."""
    most = WORKERS_PER_CPU * (os.cpu_count() or 1)
    if not 0 <= num_workers <= most:
        raise DatasetError(f"{num_workers} data loader workers: give 0 (load in the main process) to {most} "
                           f"({WORKERS_PER_CPU} per CPU of this machine)")
    return num_workers


def _seed_worker(worker_id: int) -> None:
    # the seed torch gave this worker (drawn from the loader's generator, new every epoch) reaches the
    # numpy and random that timm's and PIL's transforms draw from; torch's generator stays as it is
    seed_everything(torch.initial_seed(), cuda=False)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order is a pure function of ``seed`` (and the epoch).

    With ``distributed=True`` a :class:`DistributedSampler` splits the data
    across ranks; call :func:`set_epoch` before each epoch so that it, and the
    dataset's augmentation, reshuffle.
    """
    check_workers(num_workers)
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if distributed else None
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=False,  # workers must see the dataset state set by set_epoch
        pin_memory=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler and dataset which epoch starts (reshuffle + re-augment)."""
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
