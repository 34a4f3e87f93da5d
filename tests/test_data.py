"""Tests of snnet.data: IDX parsing, error messages, the real Fashion-MNIST split, loaders."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from snnet.data import (
    SPLITS,
    DatasetError,
    FashionMNIST,
    build_dataset,
    make_loader,
    num_classes,
    read_idx,
    set_epoch,
    validation_indices,
)
from snnet.errors import SnnetError
from snnet.results import load_results

from .conftest import _damage, _folder, _one_line, _refuse_listing, _run

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
requires_fmnist = pytest.mark.skipif(
    not (DEBIAN_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


def idx_bytes(data: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format (type 0x08)."""
    header = bytes([0, 0, 0x08, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    return header + data.numpy().tobytes()


def write_fake_fmnist(root: Path, n: int = 8, gz: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny Fashion-MNIST test split: image i is filled with the value 10 * i."""
    images = (torch.arange(n, dtype=torch.uint8) * 10).view(n, 1, 1).expand(n, 28, 28).contiguous()
    labels = torch.arange(n, dtype=torch.uint8) % 10
    for stem, data in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        raw = idx_bytes(data)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images, labels = write_fake_fmnist(tmp_path, gz=gz)
    ds = FashionMNIST(tmp_path, "test", mean=(0.0,), std=(1.0,))
    assert len(ds) == 8 and num_classes(ds) == 10
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 3
    torch.testing.assert_close(image, torch.full((1, 28, 28), 30 / 255))


def test_normalization_and_limit(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, "test", mean=(0.5,), std=(0.25,), limit=5)
    assert len(ds) == 5
    torch.testing.assert_close(ds[0][0], torch.full((1, 28, 28), -2.0))


def test_read_idx_shape(tmp_path: Path) -> None:
    data = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(data))
    assert torch.equal(read_idx(tmp_path / "x"), data)
    with pytest.raises(DatasetError, match="expected a 1-d"):
        read_idx(tmp_path / "x", expected_ndim=1)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:-5], "truncated|corrupt"),
        (lambda raw: b"\x12\x34" + raw[2:], "bad magic"),
        (lambda raw: b"not gzip at all", "cannot read|bad magic"),
    ],
)
def test_corrupt_file(tmp_path: Path, corrupt, message: str) -> None:
    write_fake_fmnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DatasetError, match=message) as info:
        FashionMNIST(tmp_path, "test")
    assert str(path) in str(info.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="cannot read IDX file"):
        FashionMNIST(tmp_path, "test")


def test_gzip_with_a_corrupt_body_is_refused_in_one_line(tmp_path: Path) -> None:
    """A gzip header followed by damaged compressed data (a bad download, a bad disk): zlib.error, which
    is not an OSError, came through as a traceback instead of the one line saying to re-fetch the file."""
    write_fake_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[:10] + b"\xff" * 8 + raw[18:])  # the header kept, the first deflate block broken
    with pytest.raises(DatasetError, match="cannot read IDX file") as info:
        FashionMNIST(tmp_path, "test")
    assert str(path) in str(info.value)


def test_an_idx_file_that_cannot_be_read_for_permissions_is_not_called_damaged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole file this user may not read was met with "delete it and re-fetch it", which loses it. Root reads
    any file, so the refusal is simulated."""
    write_fake_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    real = Path.read_bytes

    def refusing(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    with pytest.raises(DatasetError, match="permission denied; make it readable") as info:
        FashionMNIST(tmp_path, "test")
    assert "delete" not in str(info.value) and str(path) in str(info.value)


def test_images_that_are_not_bytes_are_refused(tmp_path: Path) -> None:
    """A float IDX file (type 0x0D, pixels in [0, 1]) was read and normalised as 0-255: every image near black."""
    write_fake_fmnist(tmp_path, gz=False)
    pixels = torch.rand(8, 28, 28)
    header = bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", 8, 28, 28)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + pixels.numpy().astype(">f4").tobytes())
    with pytest.raises(DatasetError, match="IDX pixels of type float32, Fashion-MNIST's are unsigned bytes"):
        FashionMNIST(tmp_path, "test")


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(DatasetError, match="do not match"):
        FashionMNIST(tmp_path, "test")


def test_missing_folder_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        FashionMNIST(tmp_path / "nowhere", "train")
    message = str(info.value)
    assert isinstance(info.value, SnnetError)
    assert "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data.root DIR` (snnet train, snnet demo" in message and "`--data-dir DIR` for snnet stitches" in message
    # snnet eval has no --data-dir (the message told it to use one): the env var is its way
    assert "for eval" not in message and "SNNET_FASHION_MNIST=DIR (every command)" in message
    assert _run(["eval", "--data-dir", str(tmp_path)]) == 2
    # one line, and the download option named with the commands that have it
    assert "\n" not in message and message.count("download") == message.count("snnet train/demo --data.download") + 1


def test_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_fmnist(tmp_path)
    monkeypatch.setenv("SNNET_FASHION_MNIST", str(tmp_path))
    assert len(build_dataset("fashion-mnist", "test")) == 8


def test_augmentation_is_seeded(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(16, dtype=torch.uint8)))
    a = FashionMNIST(tmp_path, "test", augment=True, seed=1)
    b = FashionMNIST(tmp_path, "test", augment=True, seed=1)
    plain = FashionMNIST(tmp_path, "test")
    stack = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])  # noqa: E731
    first = stack(a)
    assert torch.equal(first, stack(b))
    assert not torch.equal(first, stack(plain))
    a.set_epoch(1)
    assert not torch.equal(first, stack(a))
    assert first.shape == (16, 1, 28, 28)


def test_crop_padding_zero_augments_by_flips_alone(tmp_path: Path) -> None:
    """data.crop_padding: 0 is 'flip' (the converged recipe's search: the crop shifts the image against the 7x7
    patch grid), the default 2 shifts images too; other datasets refuse it (timm's transform augments them)."""
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(32, dtype=torch.uint8)))
    plain = FashionMNIST(tmp_path, "test")
    flips = build_dataset("fashion-mnist", "test", augment=True, root=tmp_path, crop_padding=0)
    crops = build_dataset("fashion-mnist", "test", augment=True, root=tmp_path)  # None: the dataset's 2 pixels
    kinds = []
    for i in range(len(plain)):
        x, f, c = plain[i][0], flips[i][0], crops[i][0]
        assert torch.equal(f, x) or torch.equal(f, x.flip(-1))  # never shifted
        kinds.append(torch.equal(f, x))
        assert torch.equal(f, c) or not (torch.equal(c, x) or torch.equal(c, x.flip(-1)))  # shifted unless (0, 0)
    assert 0 < sum(kinds) < len(kinds)  # some flipped, some not
    assert not all(torch.equal(crops[i][0], flips[i][0]) for i in range(len(plain)))
    assert "augment=flip" in repr(flips) and "augment=crop2+flip" in repr(crops) and "augment=none" in repr(plain)
    with pytest.raises(DatasetError, match="crop padding must be >= 0"):
        FashionMNIST(tmp_path, "test", augment=True, crop_padding=-1)
    with pytest.raises(DatasetError, match="crop padding 0 is Fashion-MNIST's own crop"):
        build_dataset(str(tmp_path / "nowhere"), "train", augment=True, crop_padding=0)


def _random_fmnist(root: Path, n: int = 16) -> None:
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(torch.arange(n, dtype=torch.uint8) % 10))


def test_repeated_augmentation_crops_and_flips_each_fashion_mnist_copy_on_its_own(tmp_path: Path) -> None:
    """--data.repeated_aug 3 (the deit and levit recipes): the three copies of a Fashion-MNIST image were one
    image three times (its crop and flip are drawn per epoch and index). The epoch sampler gives each copy as
    (index, copy), drawn on its own; an epoch keeps its length, and iterating the dataset directly still ends
    (indices past the end are an IndexError: a loop that never ended took all memory)."""
    import itertools

    from snnet.sampling import EpochSampler, SeededItems

    _random_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, "test", augment=True, seed=1)
    assert SeededItems.wrap(ds, 1) is ds and ds.distinct_copies
    order = EpochSampler(len(ds), seed=1, repeats=3, distinct_copies=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=order)
    batches = [x for x, _ in loader]
    assert len(order) == len(ds) and sum(len(x) for x in batches) == len(ds)  # an epoch is still 16 images
    full = [x for x in batches if len(x) == 3]  # each batch: the three copies of one image
    assert all(not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])) for x in full)
    assert sum(torch.equal(x[0], x[1]) or torch.equal(x[1], x[2]) or torch.equal(x[0], x[2]) for x in full) <= 1
    assert all(torch.equal(ds[i][0], ds[(i, 0)][0]) for i in range(len(ds)))  # copy 0: the image as before
    again = FashionMNIST(tmp_path, "test", augment=True, seed=1)
    assert all(torch.equal(again[(i, 2)][0], ds[(i, 2)][0]) for i in range(len(ds)))  # a pure function of the seed
    for data in (ds, SeededItems(ds, 1)):
        assert len(list(itertools.islice(iter(data), 3 * len(ds)))) == len(ds)  # not an endless loop
        with pytest.raises(IndexError):
            data[len(ds)]


def test_training_with_repeated_augmentation_reads_each_fashion_mnist_copy(tmp_path: Path) -> None:
    """train() gives a Fashion-MNIST dataset the copies of its images as (index, copy), not one index three times."""
    import snnet
    from snnet.train import train

    from .conftest import TINY_VITS, cfg

    class Recording(FashionMNIST):
        def __getitem__(self, index):
            self.read.append(index)
            return super().__getitem__(index)

    _random_fmnist(tmp_path)
    ds = Recording(tmp_path, "test", augment=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds.read = []
    torch.manual_seed(0)
    train(snnet.create_snnet(TINY_VITS[:2], img_size=28), ds,
          cfg(tmp_path, repeated_aug=3, init_images=0, max_steps=2, batch_size=6))
    copies = [k for k in ds.read if isinstance(k, tuple)]  # (train reads image 0 once to check its shape)
    assert len(copies) == 2 * 6 and copies[:3] == [(copies[0][0], c) for c in range(3)], ds.read


def test_loader_is_reproducible(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path, n=20)
    ds = FashionMNIST(tmp_path, "test", augment=True, seed=0)

    def run(seed: int) -> list[torch.Tensor]:
        loader = make_loader(ds, batch_size=6, shuffle=True, seed=seed)
        out = []
        for epoch in range(2):
            set_epoch(loader, epoch)
            out += [torch.cat([x.flatten(), y.float()]) for x, y in loader]
        return out

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # Each epoch visits every sample exactly once.
    loader = make_loader(ds, batch_size=6, shuffle=True, seed=3)
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(ds.labels.tolist())


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / split / cls / "0.png")
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "interpolation": "bilinear", "crop_pct": 1.0}
    ds = build_dataset(tmp_path, "val", config)
    assert num_classes(ds) == 3 and len(ds) == 3
    image, label = ds[2]
    assert image.shape == (3, 32, 32) and label == 2
    assert len(build_dataset(tmp_path, "train", config, augment=True, limit=2)) == 2


def test_an_image_folder_with_val_and_test_gives_each_split_its_own(tmp_path: Path) -> None:
    """root/train, root/val and root/test: --split test (snnet eval's default) read val/, so the
    accuracy reported as the test set's was the validation set's."""
    from PIL import Image

    for split, n in (("train", 1), ("val", 2), ("test", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / split / cls / f"{k}.png")
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
              "crop_pct": 1.0}
    sizes = {split: len(build_dataset(tmp_path, split, config)) for split in ("train", "val", "validation", "test", "eval")}
    assert sizes == {"train": 2, "val": 4, "validation": 4, "test": 6, "eval": 6}
    (tmp_path / "test").rename(tmp_path / "held-out")  # no test/: a test split is the validation folder, as before
    assert len(build_dataset(tmp_path, "test", config)) == 4
    # a split the folder has no folder for was read from the folder itself: its split folders as one class each
    # (snnet eval on a tree with only train/ said "has 1 classes", the class 'train')
    (tmp_path / "val").rename(tmp_path / "held-out-too")
    for split in ("val", "test"):
        with pytest.raises(DatasetError, match=f"has train/ but no folder for the '{split}' split"):
            build_dataset(tmp_path, split, config)


def test_empty_or_missing_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="ImageFolder"):
        build_dataset(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(str(tmp_path / "missing" / "dir"), "train")


def test_typoed_folder_name_is_called_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A bare name that is no folder (a typo) was passed to timm, which reads such a name from ``root``:
    without one it said "TypeError: stat: path should be string ... not NoneType", with a missing one
    "AssertionError"."""
    from PIL import Image

    from snnet.data import check_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="dataset folder nonexist does not exist"):
        check_source("nonexist", "val")
    with pytest.raises(DatasetError, match="dataset folder nonexist does not exist"):
        build_dataset("nonexist", "val", {"input_size": (3, 32, 32)})
    with pytest.raises(DatasetError, match="root folder .*gone, which does not exist"):
        check_source("imagenet", "val", root=tmp_path / "gone")
    with pytest.raises(DatasetError, match="root folder .*gone, which does not exist"):
        build_dataset("imagenet", "val", {"input_size": (3, 32, 32)}, root=tmp_path / "gone")
    capsys.readouterr()
    assert _run(["eval", "--data", "nonexist"]) != 0
    assert "dataset folder nonexist does not exist" in _one_line(capsys.readouterr().err)
    # an empty name (`--data "$DATA"`, the variable unset) was the current folder, read as an image folder
    (tmp_path / "c0").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c0" / "0.png")
    for empty in ("", " "):
        with pytest.raises(DatasetError, match="the dataset name is empty"):
            check_source(empty, "val")
        with pytest.raises(DatasetError, match="the dataset name is empty"):
            build_dataset(empty, "val", {"input_size": (3, 32, 32)})


def test_a_timm_dataset_that_cannot_be_read_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch/ names without a root said "TypeError: expected str, bytes or os.PathLike object, not NoneType";
    hfds/ names without the `datasets` package ended in a ModuleNotFoundError traceback."""
    import sys

    with pytest.raises(DatasetError, match="'torch/cifar10' is read from .*a folder: give it as --data.root DIR"):
        build_dataset("torch/cifar10", "val", RGB32)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "timm.data.readers.reader_hfds", raising=False)
    with pytest.raises(DatasetError, match="'hfds/x' needs the Python package datasets, .*pip install datasets"):
        build_dataset("hfds/x", "val", RGB32)


@requires_fmnist
def test_real_fashion_mnist_test_split() -> None:
    ds = build_dataset("fashion-mnist", "test")
    assert len(ds) == 10_000 and num_classes(ds) == 10
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    labels = torch.bincount(ds.labels, minlength=10)
    assert labels.tolist() == [1000] * 10


def write_fake_train_file(root: Path, counts: list[int]) -> torch.Tensor:
    """A fake Fashion-MNIST training file with ``counts[c]`` images of class c, classes interleaved;
    image i is filled with i % 256 (so images can be told apart). Returns the labels."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = (torch.arange(len(labels)) % 256).to(torch.uint8).view(-1, 1, 1).expand(-1, 28, 28).contiguous()
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return labels.long()


def test_validation_split_is_disjoint_stratified_and_deterministic(tmp_path: Path) -> None:
    counts = [48, 30, 12, 6, 18, 24, 36, 7, 11, 54]  # 246 images: fewer than 256, see below
    labels = write_fake_train_file(tmp_path, counts)
    train, val, full = (FashionMNIST(tmp_path, s) for s in ("train", "val", "train+val"))
    assert len(full) == sum(counts) and len(train) + len(val) == len(full)
    # One image in six of every class, the rest in train.
    assert torch.bincount(val.labels, minlength=10).tolist() == [round(n / 6) for n in counts]
    assert torch.bincount(train.labels, minlength=10).tolist() == [n - round(n / 6) for n in counts]
    # Disjoint, and together exactly the training file (image i holds the value i % 256; with
    # fewer than 256 images that value identifies it).
    ids = lambda ds: set(ds.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and ids(train) | ids(val) == ids(full) == set(range(len(full)))
    # A pure function of the labels and the seed: rebuilding gives the same images, another
    # seed another (still stratified) choice.
    assert torch.equal(FashionMNIST(tmp_path, "val").images, val.images)
    assert torch.equal(validation_indices(labels), validation_indices(labels.clone()))
    other = validation_indices(labels, seed=1)
    assert not torch.equal(other, validation_indices(labels))
    assert torch.bincount(labels[other], minlength=10).tolist() == [round(n / 6) for n in counts]


def test_split_names(tmp_path: Path) -> None:
    write_fake_train_file(tmp_path, [6] * 10)
    assert len(FashionMNIST(tmp_path, "validation")) == len(FashionMNIST(tmp_path, "val")) == 10
    assert len(FashionMNIST(tmp_path, "full-train")) == 60
    assert len(FashionMNIST(tmp_path, "train", limit=7)) == 7
    with pytest.raises(DatasetError, match="unknown Fashion-MNIST split 'dev'; use one of train, val, train\\+val, test"):
        FashionMNIST(tmp_path, "dev")
    assert SPLITS == ("train", "val", "train+val", "test")


@requires_fmnist
def test_real_fashion_mnist_validation_split() -> None:
    train, val = build_dataset("fashion-mnist", "train"), build_dataset("fashion-mnist", "val")
    assert (len(train), len(val)) == (50_000, 10_000)
    assert torch.bincount(val.labels, minlength=10).tolist() == [1_000] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [5_000] * 10
    # Pinned: the split must be the same on every machine and every library version, since
    # results measured on it are compared across runs.
    chosen = validation_indices(build_dataset("fashion-mnist", "train+val").labels)
    assert chosen[:5].tolist() == [3, 7, 9, 18, 23] and int(chosen.sum()) == 300_503_501


# ------------------------------------------------------------------ image folders a user really has


RGB32 = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_named_in_one_line(tmp_path: Path, workers: int) -> None:
    """A corrupt JPEG stops the loader with an UnreadableImageError naming the file, in one line, also when
    a loader worker read it (torch re-creates the error from its traceback text)."""
    from snnet.data import UnreadableImageError

    corrupt, _ = _damage(_folder(tmp_path))
    ds = build_dataset(tmp_path, "val", RGB32)
    with pytest.raises(UnreadableImageError) as raised:
        for _ in make_loader(ds, batch_size=4, shuffle=False, num_workers=workers):
            pass
    assert raised.value.path == corrupt
    message = str(raised.value)
    assert message.startswith(f"{corrupt}: unreadable image (") and "--skip-bad-images" in message
    assert "\n" not in message and "Traceback" not in message


def test_skip_unreadable_leaves_out_and_lists_the_bad_images(tmp_path: Path) -> None:
    from snnet.data import skipped_images

    corrupt, truncated = _damage(_folder(tmp_path))
    ds = build_dataset(tmp_path, "val", RGB32, skip_unreadable=True)
    assert len(ds) == 9 and num_classes(ds) == 3
    assert [p for p, _ in skipped_images(ds)] == [str(corrupt), str(truncated)]
    assert all(reason for _, reason in skipped_images(ds))
    assert sorted(y for _, y in make_loader(ds, batch_size=9, shuffle=False) for y in y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3
    # with a limit, only the images up to the limit's last good one are read (and reported)
    first = build_dataset(tmp_path, "val", RGB32, skip_unreadable=True, limit=6)
    assert len(first) == 6 and skipped_images(first) == ()
    seven = build_dataset(tmp_path, "val", RGB32, skip_unreadable=True, limit=7)
    assert len(seven) == 7 and [p for p, _ in skipped_images(seven)] == [str(corrupt)]
    with pytest.raises(DatasetError, match="applies to image folders"):
        build_dataset("fashion-mnist", "test", skip_unreadable=True)


def test_a_seeded_limit_of_a_folder_is_spread_over_its_classes(tmp_path: Path) -> None:
    """A folder lists its classes one after another: its first 6 images (a plain limit) are all class0; with
    limit_seed (the calibration images and --limit of `snnet eval`, KLAS's) they come from several classes, the
    same for the same seed, also when unreadable images are skipped (only the images kept are decoded)."""
    from snnet.data import skipped_images

    _damage(_folder(tmp_path, per_class=6))

    def labels(ds) -> list[int]:
        return [y for _, ys in make_loader(ds, batch_size=64, shuffle=False) for y in ys.tolist()]

    assert labels(build_dataset(tmp_path, "val", RGB32, limit=6)) == [0] * 6
    spread = build_dataset(tmp_path, "val", RGB32, limit=6, limit_seed=0, skip_unreadable=True)
    assert len(spread) == 6 and len(set(labels(spread))) > 1
    assert labels(spread) == labels(build_dataset(tmp_path, "val", RGB32, limit=6, limit_seed=0, skip_unreadable=True))
    assert len(build_dataset(tmp_path, "val", RGB32, limit=100, limit_seed=0, skip_unreadable=True)) == 18


def test_a_folder_of_grayscale_pngs_feeds_a_one_channel_network(tmp_path: Path) -> None:
    """Images are read in the network's channels, as `snnet serve` converts an upload: an 'L' folder
    feeds the 1-channel Fashion-MNIST family, an RGB folder is converted to 'L' the way PIL does."""
    from PIL import Image

    from snnet.data import image_transform

    gray = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center"}
    _folder(tmp_path / "l", mode="L", size=28)
    _folder(tmp_path / "rgb", mode="RGB", size=28)
    transform = image_transform(gray)
    for name, mode in (("l", "L"), ("rgb", "RGB")):
        ds = build_dataset(tmp_path / name, "val", gray)
        x, y = ds[4]
        assert x.shape == (1, 28, 28) and y == 1
        with Image.open(tmp_path / name / "class1" / "1.png") as img:
            assert img.mode == mode
            assert torch.equal(x, transform(img.convert("L")))
    assert build_dataset(tmp_path / "l", "val", RGB32)[0][0].shape == (3, 32, 32)  # and L -> RGB for an RGB network
    # a 16-bit grayscale PNG is scaled to 8 bits, not clipped (Pillow's own conversion turns it nearly white)
    deep = (torch.arange(28 * 28, dtype=torch.int32).view(28, 28) * 83).numpy().astype("uint16")
    (tmp_path / "deep" / "c").mkdir(parents=True)
    Image.fromarray(deep).save(tmp_path / "deep" / "c" / "0.png")
    x, _ = build_dataset(tmp_path / "deep", "val", gray)[0]
    want = torch.from_numpy((deep.astype("int64") * 255 // 65535).astype("float32")) / 255
    assert torch.allclose(x[0], (want - 0.286) / 0.353, atol=1e-5)
    # so is a 16-bit PGM (maxval 65535), which Pillow opens in mode "I" (it was clipped: nearly white)
    (tmp_path / "pgm" / "c").mkdir(parents=True)
    (tmp_path / "pgm" / "c" / "0.pgm").write_bytes(b"P5\n28 28\n65535\n" + deep.astype(">u2").tobytes())
    x, _ = build_dataset(tmp_path / "pgm", "val", gray)[0]
    assert torch.allclose(x[0], (want - 0.286) / 0.353, atol=1e-5)
    with pytest.raises(DatasetError, match="2-channel"):
        build_dataset(tmp_path / "l", "val", dict(gray, input_size=(2, 28, 28)))


def test_a_folders_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path: Path) -> None:
    """A phone photo (EXIF Orientation 6: stored turned a quarter) was read as stored, sideways; it is read upright,
    as viewers show it and `snnet serve` decodes it."""
    import numpy as np
    from PIL import Image

    from snnet.data import ImageReader

    upright = np.zeros((32, 24), np.uint8)
    upright[:16] = 255  # top half white
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "c").mkdir()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "c" / "0.jpg", quality=95,
                                                                         exif=exif.tobytes())
    pixels = np.asarray(ImageReader("L")(tmp_path / "c" / "0.jpg"))
    assert pixels.shape == upright.shape and np.abs(pixels.astype(int) - upright).mean() < 8


def test_three_augment_refuses_an_unknown_interpolation_in_one_line() -> None:
    """3-Augment's resize looked its interpolation up in timm's table outside the transform's checks: KeyError."""
    from snnet.data import image_transform

    for bad in ("bogus", "random"):
        with pytest.raises(DatasetError, match=f"3-Augment cannot resize with interpolation '{bad}'"):
            image_transform(RGB32, True, {"three_augment": True, "interpolation": bad})
    assert image_transform(RGB32, True, {"three_augment": True, "interpolation": "bilinear"}) is not None


def test_a_class_folder_that_cannot_be_read_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision says "Found no valid file" for a class folder it cannot list (chmod 000); snnet names the
    folder and the fix. Root reads any folder, so the refusal of the listing is simulated here (and real in
    test_a_chmod_000_class_folder_is_named when not root)."""
    _folder(tmp_path)
    locked = _refuse_listing(tmp_path / "class1", monkeypatch)
    with pytest.raises(DatasetError) as raised:
        build_dataset(tmp_path, "val", RGB32)
    message = str(raised.value)
    assert f"class folder {locked} cannot be read (Permission denied)" in message and "chmod" in message
    assert "Found no valid file" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 folder")
def test_a_chmod_000_class_folder_is_named(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "class1").chmod(0)
    try:
        with pytest.raises(DatasetError, match=r"class folder .*class1 cannot be read"):
            build_dataset(tmp_path, "val", RGB32)
    finally:
        (tmp_path / "class1").chmod(0o755)


def test_an_empty_class_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "class3").mkdir()
    (tmp_path / "class3" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as raised:
        build_dataset(tmp_path, "val", RGB32)
    message = str(raised.value)
    assert "class3" in message and ".png" in message and "at least one image" in message
    assert "\n" not in message


# ------------------------------------------------------------------ damaged image folders, through `snnet eval`


def test_eval_names_the_unreadable_image_and_skips_it_on_request(tiny3: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data = _folder(tmp_path / "data")
    corrupt, truncated = _damage(data)
    out = tmp_path / "out"
    base = ["eval", "--model", tiny3, "--data", data, "--out", out, "--no-progress", "--batch-size", "4"]
    assert _run(base) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(corrupt) in line and "--skip-bad-images" in line
    assert not (out / "results.json").exists()  # nothing half-written
    assert _run(base + ["--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert f"skipped 2 unreadable images of {data}" in err and str(corrupt) in err
    assert all(r.images == 9 for r in load_results(out))


def test_eval_of_grayscale_pngs_with_the_shipped_one_channel_family(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The shipped Fashion-MNIST family (1 channel) evaluates a folder of 28x28 grayscale PNGs (it refused
    them: the folder was read as RGB)."""
    data = _folder(tmp_path / "gray", classes=10, per_class=1, mode="L", size=28)
    code = _run(["eval", "--data", data, "--calib-images", "4", "--stitches", "0", "--out", tmp_path / "o",
                 "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [r.images for r in load_results(tmp_path / "o")] == [10]


def test_a_class_folder_that_cannot_be_listed_is_one_line_in_eval(tiny3: Path, tmp_path: Path, capsys,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A chmod-000 class folder (simulated: root reads anything) is named instead of "Found no valid file"."""
    data = _folder(tmp_path / "data")
    locked = _refuse_listing(data / "class1", monkeypatch)
    assert _run(["eval", "--model", tiny3, "--data", data, "--out", tmp_path / "o", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"class folder {locked} cannot be read (Permission denied)" in line and "Found no valid file" not in line
