"""The command line: real commands, their output, and their errors (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from snnet.cli import main


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
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not built or line in NEEDS_THE_SPACE, f"a network was built before {line!r} was refused"
    if "--data-dir" in line or "demo --data" in line:  # `snnet train` has no --download: do not suggest it there
        assert err.count("--download") == err.count("snnet demo --download")
