"""The command line: real commands, their output, and their errors (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snnet
from snnet.cli import main
from .conftest import TINY_VITS, _folder, _one_line, _run


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snnet", *args], capture_output=True, text=True, timeout=300)


def test_stitches_json_lists_the_space(capsys: pytest.CaptureFixture) -> None:
    main(["stitches", "--anchors", "snnet_tiny_vit_ti,snnet_tiny_vit_s,snnet_tiny_vit_b", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 23
    assert all({"id", "name", "flops", "params"} <= set(r) for r in rows)
    assert all(isinstance(r["flops"], int) and isinstance(r["params"], int) for r in rows)
    assert [r["id"] for r in rows] == list(range(23))


def test_stitches_table_and_options(capsys: pytest.CaptureFixture) -> None:
    main(["stitches", "--anchors", "snnet_tiny_vit_ti,snnet_tiny_vit_s", "--img-size", "64", "--stride", "2"])
    out = capsys.readouterr().out
    assert "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[0:]" in out
    assert out.strip().splitlines()[-1].startswith("10 networks (2 anchors, 8 stitches, 2 stitching layers)")
    assert "at 64x64" in out


@pytest.mark.parametrize("args, message", [
    (["stitches", "--anchors", "deit_tiny,snnet_tiny_vit_s"], "unknown model name 'deit_tiny'"),
    (["stitches", "--anchors", "snnet_tiny_vit_s"], "at least two"),
])
def test_errors_are_messages_not_tracebacks(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# Bad command lines: each must exit 2 with one line saying what is wrong — no traceback — and,
# but where the stitch space is needed to judge the value, before any network is built.
# FILE is an existing file; TINY two tiny anchors.
BAD_LINES = [
    # train: the list, then every other option
    "train --out FILE", "train --out /sys/kernel/snnet-out", "train --device cuda:7", "train --device foo",
    "train --lr nan", "train --lr inf", "train --lr 0", "train --workers -1", "train --workers abc",
    "train --weight-decay nan", "train --weight-decay -1", "train --anchor-lr-scale nan", "train --warmup-steps -3",
    "train --limit-train -5", "train --limit-train 0", "train --num-classes 0", "train --epochs 0",
    "train --max-steps 0", "train --batch-size 0", "train --num-buckets 0", "train --ckpt-every -1",
    "train --init-images -1", "train --sampler fancy", "train --amp fp8", "train --stitch-sync nope",
    "train --seed -1", "train --resume /nonexistent", "train --resume auto --overwrite",
    "train --data /nonexistent/images", "train --data-dir /nonexistent", "train --weights /nonexistent/a",
    "train --distill not_a_model", "train --init /nonexistent", "train --anchors nope_a,nope_b", "train --bogus",
    # stitches
    "stitches --img-size 0", "stitches --kernel-size 0", "stitches --stride -1", "stitches --anchors nope_a,nope_b",
    "stitches --anchors snnet_tiny_vit_s",
    # eval
    "eval --batch-size 0", "eval --limit 0", "eval --workers -1", "eval --device foo", "eval --stitches ,",
    "eval --data /nonexistent/images", "eval --split nope", "eval --out FILE", "eval --model /nonexistent",
    "eval --calib-images 0",
    # profile
    "profile --batch-size 0", "profile --repeats 0", "profile --warmup -1", "profile --threads 0",
    "profile --img-size 0", "profile --device foo", "profile --out FILE", "profile --model /nonexistent",
    # select
    "select", "select flops<=abc", "select flops<=1G --results /nonexistent", "select flops<=1G --model /nonexistent",
    # export
    "export", "export --stitch 999", "export --stitch 1 --format gif", "export --stitch 1 --batch-size 0",
    "export --stitch 1 --out FILE", "export --stitch 1 --model /nonexistent",
    # demo
    "demo --steps 0", "demo --batch-size 0", "demo --lr nan", "demo --lr inf", "demo --anchor-lr-scale nan",
    "demo --distill-alpha 2", "demo --distill-alpha nan", "demo --eval-limit 0", "demo --train-limit -5",
    "demo --sampler fancy", "demo --device foo", "demo --seed -1", "demo --data /nonexistent", "demo --out FILE",
    # language models: train --task causal-lm, generate
    "train --task fancy", "train --task causal-lm --data.mixup 0.5", "train --task causal-lm --data.corpus /nonexistent",
    "train --task causal-lm --data.block_size 0", "train --task causal-lm --data.held_out 1",
    "train --task causal-lm --run.fsdp true", "train --task causal-lm --model.anchor_lora_rank -1",
    "generate --model /nonexistent --prompt x", "generate --model FILE --prompt x",
]
NEEDS_THE_SPACE = {"export --stitch 999"}  # the stitch ids come from the (meta-device) space


@pytest.mark.parametrize("line", BAD_LINES)
def test_every_bad_command_line_is_one_line_and_exit_2(line: str, tmp_path, monkeypatch, capsys) -> None:
    import os
    import shlex
    import tempfile

    import snnet.model

    if "/sys/kernel" in line:  # sysfs: read-only even for root
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no /sys/kernel here")
        try:
            fd, probe = tempfile.mkstemp(dir="/sys/kernel")
        except OSError:
            pass
        else:
            os.close(fd)
            os.unlink(probe)
            pytest.skip("/sys/kernel is writable here")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    built: list[int] = []
    original = snnet.model.StitchedNet.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(snnet.model.StitchedNet, "__init__", counting_init)
    monkeypatch.chdir(tmp_path)  # default output folders land here
    with pytest.raises(SystemExit) as exited:
        main(shlex.split(line.replace("FILE", str(afile))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], f"{line!r} left files behind"  # nothing made
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not built or line in NEEDS_THE_SPACE, f"a network was built before {line!r} was refused"
    if "--data-dir" in line or "demo --data" in line:  # `snnet train` has no --download: do not suggest it there
        assert err.count("--download") == err.count("snnet demo --download")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set: start the 2 processes with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "one", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK='one' is not the rank"),
])
def test_a_half_torchrun_environment_is_one_line_before_any_work(env, message, tmp_path, monkeypatch, capsys) -> None:
    """WORLD_SIZE without the rest of torchrun's environment (exported by hand, or left by a job script): joining the
    process group raised "environment variable RANK expected, but not set" with a traceback, after the network was built."""
    import snnet.model

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(snnet.model.StitchedNet, "__init__", lambda *a, **k: pytest.fail("a network was built"))
    data = _folder(tmp_path / "images")
    with pytest.raises(SystemExit) as exited:
        main(["train", "--anchors", ",".join(TINY_VITS[:2]), "--data", str(data), "--device", "cpu", "--no-progress",
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in _one_line(err)
    assert not (tmp_path / "run").exists()


def test_an_unknown_validation_split_is_refused_before_the_network_is_built(tmp_path, monkeypatch, capsys) -> None:
    """`--data.val_split nope` (or a split the image folder lacks) was refused only once the network was built and
    its stitching layers set up: with pretrained anchors, after their download."""
    import snnet.model

    monkeypatch.setattr(snnet.model.StitchedNet, "__init__", lambda *a, **k: pytest.fail("a network was built"))
    data = _folder(tmp_path / "images")
    with pytest.raises(SystemExit) as exited:
        main(["train", "--anchors", ",".join(TINY_VITS[:2]), "--data", str(data), "--device", "cpu", "--no-progress",
              "--out", str(tmp_path / "run"), "--data.val_split", "nope"])
    assert exited.value.code == 2 and "unknown split 'nope'" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_an_evaluation_of_some_stitches_does_not_drop_the_results_of_the_others(tiny3, tmp_path, capsys) -> None:
    """`snnet eval --stitches 1,2 --out DIR` into the folder of an evaluation of every stitch wrote results.json anew
    with those two rows: the other networks' accuracies (and latencies `snnet profile` had added) were lost."""
    from dataclasses import replace

    from snnet.results import write_results

    data, out = _folder(tmp_path / "images"), tmp_path / "out"
    write_results([replace(r, acc1=50.0, images=9) for r in snnet.load(tiny3).costs()], out)  # every stitch evaluated
    before = (out / "results.json").read_bytes()
    assert _run(["eval", "--model", str(tiny3), "--data", str(data), "--out", str(out), "--no-progress", "--device",
                 "cpu", "--stitches", "1,2"]) == 2
    assert "not among --stitches" in _one_line(capsys.readouterr().err)
    assert (out / "results.json").read_bytes() == before
    listed = tmp_path / "listed"  # rows with nothing measured (a profile's listing of the others) are not kept from it
    write_results(snnet.load(tiny3).costs(), listed, csv_file=False)
    assert _run(["eval", "--model", str(tiny3), "--data", str(data), "--out", str(listed), "--no-progress", "--device",
                 "cpu", "--stitches", "1"]) == 0


# ----------------------------------------------------------------- SN-Netv2: two-way routes, low-rank stitching layers


def test_cli_stitches_two_way_and_klas(capsys, tmp_path) -> None:
    from snnet.cli import main

    main(["stitches", "--anchors", ",".join(TINY_VITS[:2]), "--two-way", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14 and rows[8]["name"] == "snnet_tiny_vit_s[:1]+snnet_tiny_vit_ti[1:2]+snnet_tiny_vit_s[2:]"
    with pytest.raises(SystemExit) as e:
        main(["stitches", "--anchors", ",".join(TINY_VITS), "--select", "kl"])
    assert e.value.code == 2 and "klas" in capsys.readouterr().err


@pytest.mark.parametrize("space", [["--two-way"], ["--all-pairs"], ["--chains"], ["--kernel-size", "3"], ["--stride", "2"]])
def test_cli_klas_refuses_the_options_of_the_rule_based_space(capsys, tmp_path, space) -> None:
    """KLAS scores every binary stitch of every pair of anchors itself: --two-way, --chains, ... changed nothing and
    were silently ignored (the same 32 candidates, the same kept routes); refused in one line before any work."""
    assert _run(["stitches", "--anchors", ",".join(TINY_VITS[:2]), "--select", "klas", "--data",
                 str(tmp_path / "nowhere"), *space]) == 2
    line = _one_line(capsys.readouterr().err)
    assert space[0] in line and "drop it" in line


def test_klas_routes_file_records_its_cut_and_train_refuses_another(capsys, tmp_path) -> None:
    """`stitches --select klas --cut sublayer --json` did not record the cut, and `train --routes FILE` built the
    space with its own space.cut ('block'), where the same names (a[:3]+b[3:]) count blocks: other networks, trained
    silently. The file records the cut; a run of another cut is refused in one line naming the --space.cut to give."""
    import yaml

    data = _folder(tmp_path / "calib", classes=2, per_class=4)
    assert _run(["stitches", "--anchors", ",".join(TINY_VITS[:2]), "--select", "klas", "--cut", "sublayer", "--data",
                 str(data), "--calib-images", "8", "--keep", "3", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["cut"] == "sublayer"
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(chosen))
    train = ["train", "--anchors", ",".join(TINY_VITS[:2]), "--routes", str(routes), "--print-config"]
    assert _run(train) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(routes) in line and "--cut sublayer" in line and "add --space.cut sublayer" in line
    assert _run([*train, "--space.cut", "sublayer"]) == 0
    space = yaml.safe_load(capsys.readouterr().out)["space"]
    assert space["cut"] == "sublayer" and space["routes"] == chosen["routes"]


# ------------------------------------------------------------------ options pointed at the wrong thing

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
