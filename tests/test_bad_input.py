"""What a sceptical user types: damaged image folders, files given for folders and the reverse, numbers
out of range, foreign checkpoints. Each is refused in one line, exit status 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import snnet
from snnet.cli import main
from snnet.results import load_results

from .conftest import TINY_VITS, _folder, _damage, _refuse_listing


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


def test_a_class_folder_that_cannot_be_listed_is_one_line_in_eval(tiny3: Path, tmp_path: Path, capsys,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A chmod-000 class folder (simulated: root reads anything) is named instead of "Found no valid file"."""
    data = _folder(tmp_path / "data")
    locked = _refuse_listing(data / "class1", monkeypatch)
    assert _run(["eval", "--model", tiny3, "--data", data, "--out", tmp_path / "o", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"class folder {locked} cannot be read (Permission denied)" in line and "Found no valid file" not in line


# ------------------------------------------------------------------ every other bad command line

@pytest.fixture(scope="module")
def things(tiny3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What a user may point an option at: files of every wrong kind, and folders snnet wrote."""
    import os

    from snnet.deploy import export_stitch

    root = tmp_path_factory.mktemp("things")
    (root / "notes.txt").write_text("hello\n")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "folder").mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo PWNED",))

    torch.save({"model": Evil()}, root / "evil.pth")
    export_stitch(snnet.load(tiny3), 1, root / "export", ["safetensors"])
    run = root / "run"  # the files a training run leaves
    (run / "final").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (run / "final" / name).write_bytes((tiny3 / name).read_bytes())
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04")
    data = _folder(root / "images")
    loop = _folder(root / "loop")
    (loop / "class0" / "again").symlink_to(loop, target_is_directory=True)
    return {"TINY": tiny3, "TXT": root / "notes.txt", "EMPTY": root / "empty.safetensors", "DIR": root / "folder",
            "EVIL": root / "evil.pth", "EXPORT": root / "export", "RUN": run, "IMAGES": data, "LOOP": loop}


TWO = ",".join(TINY_VITS[:2])
# a command line, and words its one-line error must hold (each was a traceback, a hang or a wrong message)
BAD = [
    ("stitches --select klas --anchors TWO --weights TXT,TXT", ["TXT is not a weights file", "starts with b'hello"]),
    ("stitches --select klas --anchors TWO --weights EMPTY,EMPTY", ["EMPTY is not a readable safetensors file"]),
    ("stitches --select klas --anchors TWO --weights DIR,DIR", ["DIR is a folder"]),
    ("stitches --select klas --anchors TWO --weights EVIL,EVIL",
     ["from EVIL: it holds Python objects besides tensors (posix.system), refused"]),
    ("stitches --select klas --anchors TWO --data-dir TXT", ["TXT is a file, not a folder"]),
    ("profile --model TINY --img-size 3", ["--img-size gives 3x3x3 inputs", "cannot take", "own input is 3x32x32"]),
    ("profile --model TINY --img-size 99999", ["3x99999x99999 inputs", "cannot take"]),
    ("profile --model TINY --batch-size 100000000", ["a batch of 100000000 inputs", "MiB are free"]),
    ("profile --model TINY --batch-sizes 1,100000000", ["a batch of 100000000 inputs", "MiB are free"]),
    ("profile --model TINY --threads 100000", ["--threads must be between 1 and this machine's"]),
    ("profile --model TINY --repeats 99999999999", ["--repeats"]),
    ("export --model TINY --stitch 1 --batch-size 100000000 --out OUT", ["a batch of 100000000 inputs"]),
    ("export --model TINY --stitch 1 --out TINY", ["not an exported stitch's", "would overwrite it"]),
    ("eval --model EXPORT --data IMAGES --out OUT", ["EXPORT is not a saved stitched network",
                                                      "one stitch exported alone", "load_stitch"]),
    ("select flops<=1G --model RUN", ["RUN is not a saved stitched network but a training run's folder",
                                       "its network is RUN/final"]),
    ("select flops<=1G --model RUN/checkpoint.pt", ["a training checkpoint"]),
    ("eval --model TINY --data TXT --out OUT", ["TXT is a file, not a dataset"]),
    ("eval --model TINY --data IMAGES --workers 100000 --out OUT", ["100000 data loader workers"]),
    ("eval --model TINY --data LOOP --out OUT", ["reached through a symbolic link"]),
    ("eval --model TINY --data IMAGES --split nope --out OUT", ["unknown split 'nope'"]),
    ("profile --model TINY --stitches ,", ["names no stitch"]),
    (f"convert --from-reference EVIL --anchors {TWO} --out OUT", ["(posix.system), refused", "--trust-checkpoint"]),
]


@pytest.mark.parametrize("line, words", BAD, ids=[b[0] for b in BAD])
def test_each_bad_command_line_is_one_line_before_any_work(line: str, words: list[str], things: dict[str, Path],
                                                           tmp_path: Path, capsys, monkeypatch) -> None:
    import shlex

    import snnet.deploy.export
    import snnet.deploy.profiling
    import snnet.evaluate
    import snnet.klas

    worked: list[str] = []
    for module, name in ((snnet.deploy.profiling, "_timed"), (snnet.deploy.export, "extract"),
                         (snnet.evaluate, "evaluate"), (snnet.klas, "klas")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: worked.append(_n))
    names = {**things, "OUT": tmp_path / "out", "TWO": TWO}

    def fill(text: str) -> str:
        for key in sorted(names, key=len, reverse=True):  # TINY before TXT... longest first
            text = text.replace(key, str(names[key]))
        return text

    capsys.readouterr()
    assert _run(shlex.split(fill(line))) == 2
    err = _one_line(capsys.readouterr().err)
    for w in words:
        assert fill(w) in err, err
    assert "weights_only" not in err and "Weights only" not in err  # no advice to unpickle unsafely
    assert not worked, f"{worked} ran before {line!r} was refused"


def test_check_input_refuses_only_what_cannot_run() -> None:
    """A CNN family takes another image size (so it is let through, and runs); a ViT's fixed patch grid and an
    input far beyond this machine's memory are refused, without allocating it."""
    from snnet.deploy.memory import available_memory, check_input
    from snnet.errors import SnnetError

    cnn = snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"]).eval()
    check_input(cnn, [2], (3, 64, 64))
    for s in cnn.space:
        cnn.select(s.id)
        assert cnn(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    side = int((available_memory() / 4) ** 0.5) + 1  # one 3-channel image of this side exceeds free memory
    with pytest.raises(SnnetError, match="MiB are free"):
        check_input(cnn, [1], (3, side, side))
    vit = snnet.create_snnet(TINY_VITS[:2])
    with pytest.raises(SnnetError, match="cannot take"):
        check_input(vit, [1], (3, 64, 64), what="--img-size")
    check_input(vit, [64])  # its own size, a batch that fits
