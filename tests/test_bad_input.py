"""What a sceptical user types: damaged image folders, files given for folders and the reverse, numbers
out of range, foreign checkpoints. Each is refused in one line, exit status 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import snnet
from snnet.cli import main
from snnet.results import load_results

from .conftest import TINY_VITS
from .test_data import _damage, _folder


def _run(args: list[str]) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 3-class stitched network of two tiny ViTs (32x32 RGB)."""
    root = tmp_path_factory.mktemp("tiny3")
    torch.manual_seed(0)
    snnet.create_snnet(TINY_VITS[:2], num_classes=3).save_pretrained(root / "net")
    return root / "net"


# ------------------------------------------------------------------ image folders


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
