"""Run safety: one run per folder, Ctrl-C, seeds that reproduce a run, checksummed weights."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import snnet
from snnet.checkpoint import CHECKPOINT_NAME, load_checkpoint, state_digest
from snnet.data import build_dataset
from snnet.deploy import export_stitch, load_stitch
from snnet.errors import CheckpointError, RunFolderError, TrainingError, TrainingInterrupted
from snnet.runlock import check_run_folder, claim_run_folder
from snnet.train import check_resume, train

from .conftest import TINY_VITS, Synthetic, cfg, fresh_net, _cli, _damage, _image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ",".join(TINY_VITS[:2])
OPT = dict(lr=1e-3, warmup_steps=2)  # the learning rate as used (cfg: not scaled)


def _train_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--anchors", TINY, "--data", str(data), "--batch-size", "4", "--init-images", "4",
            "--no-progress", "--device", "cpu", "--out", str(out), *more]


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def _same_weights(a: snnet.StitchedNet, b: snnet.StitchedNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _signal_after_steps(proc: subprocess.Popen, out: Path, sig: int, steps: int = 3, group: bool = False) -> str:
    """Send ``sig`` to a training process (``group``: to its whole process group, which it leads) once its
    run has logged ``steps`` steps; its stderr once it ended."""
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= steps):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------- one run per folder


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_forked_child_neither_holds_the_run_lock_nor_deletes_it(tmp_path):
    """A DataLoader worker is a fork of the run: it held the run's flock through the inherited descriptor,
    so after `kill -9` of the run a new run was refused, naming the dead PID, for as long as the workers
    lived. Here the run ends without releasing (as killed) while its child lives: the folder is free."""
    from snnet.runlock import LOCK_NAME, RunLock, lock_holder

    child_r, parent_w = os.pipe()
    run = os.fork()
    if run == 0:  # the run: holds the lock, forks a worker, dies without a release
        lock = RunLock.acquire(tmp_path)
        worker = os.fork()
        if worker == 0:
            lock.release()  # a worker's release (e.g. by a finally) must leave the run's lock file alone
            os.read(child_r, 1)  # lives until the test is done
            os._exit(0)
        os._exit(0)
    os.waitpid(run, 0)
    try:
        assert (tmp_path / LOCK_NAME).is_file()  # left by the killed run, as kill -9 leaves it
        assert lock_holder(tmp_path) is None
        RunLock.acquire(tmp_path).release()
    finally:
        os.write(parent_w, b"x")
        os.close(parent_w)
        os.close(child_r)


@pytest.mark.slow
def test_a_second_run_on_a_live_folder_is_refused_and_ctrl_c_leaves_the_first_intact(tmp_path):
    """Two real `snnet train` processes on one --out: the second is refused with the first's PID;
    Ctrl-C then stops the first with a checkpoint, the resume command and exit status 130."""
    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    args = [sys.executable, "-m", "snnet", *_train_args(data, out, "--epochs", "100000", "--ckpt-every", "5")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2
        assert f"in use by a running snnet train (PID {first.pid})" in _one_line(second.stderr)
        assert first.poll() is None  # still training, untouched
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    line = _one_line(err)
    assert line.startswith("stopped by SIGINT at step ")
    command = shlex.split(line.split("Resume with: ")[1])
    assert command[:2] == ["snnet", "train"] and command[-2:] == ["--resume", "auto"]
    assert sorted(command[2:-2]) == sorted(args[4:])  # the same options and values
    steps = _steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, in order: nothing interleaved
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == steps[-1]  # Ctrl-C checkpointed the last step
    assert _temps(out) == [] and not (out / ".snnet-run.lock").exists()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    assert _cli(*_train_args(data, out, "--max-steps", "2")) == 0
    run_files = [out / "metrics.jsonl", out / CHECKPOINT_NAME, out / "final" / "model.safetensors"]
    before = [p.read_bytes() for p in run_files]
    capsys.readouterr()

    # neither --resume nor --overwrite: refused in one line, nothing touched
    assert _cli(*_train_args(data, out, "--max-steps", "2")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "already holds a finished training run" in line and "--overwrite" in line
    assert [p.read_bytes() for p in run_files] == before

    # resuming the finished run says so (not "0 img/s, last loss nan"), rewrites nothing, and clears the
    # temporary files of a writer killed mid-write
    (out / f".{CHECKPOINT_NAME}.k3j4h5g6.tmp").write_bytes(b"torn")
    (out / "final" / ".model.safetensors.abcdefgh.tmp").write_bytes(b"torn")
    assert _cli(*_train_args(data, out, "--max-steps", "2", "--resume", "auto")) == 0
    said = capsys.readouterr().out
    assert "had already finished (2 of 2 steps)" in said and "nan" not in said and "img/s" not in said
    assert [p.read_bytes() for p in run_files] == before and _temps(out) == []
    # resumed into another folder, which then holds the run (test_a_finished_run_resumed_into_another_folder...)
    b = tmp_path / "b"
    assert _cli(*_train_args(data, b, "--max-steps", "2", "--resume", str(out / CHECKPOINT_NAME))) == 0
    said = capsys.readouterr().out
    assert f"the run of {out / CHECKPOINT_NAME} had already finished (2 of 2 steps), which {b} now holds" in said
    assert f"Its network is in {b / 'final'}" in said and (b / CHECKPOINT_NAME).is_file()
    assert [p.read_bytes() for p in run_files] == before

    # --overwrite deletes the old run's files on purpose (and only those)
    (out / "notes.txt").write_text("mine")
    assert _cli(*_train_args(data, out, "--max-steps", "3", "--overwrite")) == 0
    assert _steps(out) == [1, 2, 3] and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3
    assert (out / "notes.txt").read_text() == "mine"

    # --resume auto where there is no checkpoint says it starts afresh
    capsys.readouterr()
    assert _cli(*_train_args(data, tmp_path / "new", "--max-steps", "1", "--resume", "auto")) == 0
    assert "--resume auto starts a fresh run" in capsys.readouterr().err


def test_claiming_a_run_folder_removes_the_temporary_files_of_every_file_a_run_writes_atomically(tmp_path):
    """A writer killed mid-write leaves its temporary file; claiming the folder removed those of model.safetensors and
    config.json in final/ but not of a language model's adapters.safetensors (found by review): all go now."""
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"a run's")  # a run to resume (only its presence is checked on claiming)
    for name in ("final/model.safetensors", "final/config.json", "final/adapters.safetensors", "checkpoints/step-00000002.pt"):
        (out / name).with_name(f".{Path(name).name}.k3j4h5g6.tmp").write_bytes(b"torn")
    claim_run_folder(out, resume="auto").release()
    assert _temps(out) == []


def test_overwrite_deletes_the_runs_files_and_refuses_to_delete_the_users_beside_them(tmp_path):
    """--overwrite deleted final/ and tb/ whole, with the user's own files in them (notes beside the network,
    their own plots: found by review). It deletes a run's folders holding only what a run writes, and refuses
    one holding anything else in one line naming it, before anything is deleted."""
    conf = dict(max_steps=2, ckpt_every=1, init_images=0, tensorboard=True)
    train(fresh_net(), Synthetic(16), cfg(tmp_path, **conf))
    out = tmp_path / "run"
    assert {p.name for p in (out / "tb").iterdir()} and (out / "checkpoints").is_dir()
    train(fresh_net(), Synthetic(16), cfg(tmp_path, overwrite=True, **conf))  # the run's files only: replaced
    assert _steps(out) == [1, 2]

    (out / "final" / "notes.txt").write_text("mine")
    (out / "tb" / "plots").mkdir()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".snnet-run.lock"}
    for check in (lambda: check_run_folder(out, overwrite=True),
                  lambda: train(fresh_net(), Synthetic(16), cfg(tmp_path, overwrite=True, **conf))):
        with pytest.raises(RunFolderError, match="--overwrite: .* holds files a training run does not write "
                                                 "\\(final/notes.txt, tb/plots\\).*move them out"):
            check()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_refuses_a_network_of_another_program_in_final_by_the_names_of_the_runs(tmp_path):
    """--overwrite told the run's files in final/ by name only: a Hugging Face model's config.json and
    model.safetensors put there counted as the run's and were deleted (found by review). A config.json snnet did not
    write makes every file beside it the user's; the run's own final/ is still replaced."""
    conf = dict(max_steps=2, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path, **conf))
    out, final = tmp_path / "run", tmp_path / "run" / "final"
    assert check_run_folder(out, overwrite=True) is None  # snnet's own network: the run's
    (final / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (final / "model.safetensors").write_bytes(b"their weights")
    before = _bytes(out)
    for check in (lambda: check_run_folder(out, overwrite=True),
                  lambda: train(fresh_net(), Synthetic(16), cfg(tmp_path, overwrite=True, **conf))):
        with pytest.raises(RunFolderError, match="holds files a training run does not write "
                                                 "\\(final/config.json, final/model.safetensors\\)"):
            check()
    assert _bytes(out) == before


def test_overwrite_takes_the_bytes_a_killed_save_of_final_kept_for_the_runs(tmp_path):
    """A language model's save into final/ killed between its files leaves each replaced file's earlier bytes as
    <name>.previous (adapters, tokenizer files); --overwrite called them the user's files and refused."""
    from snnet.model import SAVED_NETWORK_KEYS
    from snnet.runlock import foreign_files

    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text(json.dumps(dict.fromkeys(SAVED_NETWORK_KEYS, 1)))  # snnet's own save
    for name in ("model.safetensors", "model.safetensors.previous", "adapters.safetensors.previous",
                 "tokenizer.json.previous", "vocab.json.previous", "merges.txt.previous"):
        (final / name).write_text("x")
    assert foreign_files(tmp_path) == []
    (final / "notes.txt.previous").write_text("mine")
    assert foreign_files(tmp_path) == [final / "notes.txt.previous"]


class _CtrlCAt(Synthetic):
    """Sends Ctrl-C (SIGINT) to this process while the batch of step ``step`` is fetched."""

    def __init__(self, n: int, step: int, batch_size: int) -> None:
        super().__init__(n)
        self.signal_at, self.fetched = (step - 1) * batch_size + 1, -1  # -1: train() first looks at item 0

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(i)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path):
    conf = dict(epochs=2, init_images=0)  # 5 steps an epoch: step 4 is mid-epoch
    a = fresh_net()
    train(a, Synthetic(40), cfg(tmp_path / "a", **conf, **OPT))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(fresh_net(), _CtrlCAt(40, step=4, batch_size=8), cfg(tmp_path / "b", **conf, **OPT))
    assert isinstance(stopped.value, KeyboardInterrupt) and (stopped.value.step, stopped.value.total) == (4, 10)
    assert load_checkpoint(tmp_path / "b" / "run" / CHECKPOINT_NAME)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C acts at once again
    c = fresh_net(seed=9)
    train(c, Synthetic(40), cfg(tmp_path / "b", resume="auto", **conf, **OPT))
    assert _same_weights(a, c)


def test_a_resume_with_changes_trains_with_the_new_settings(tmp_path):
    """--resume-with-changes: the rate, weight decay and anchors' rate given are the ones used from the
    saved step on (loading the optimizer's state alone brought back the saved ones: a review found the
    changes recorded in train_config.json but without effect); the optimizer itself cannot change."""
    conf = dict(epochs=3, ckpt_every=4, lr=1e-3, warmup_steps=3, weight_decay=0.05, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path / "b", **conf), stop_after=7)

    def resumed(name: str, **change) -> list[dict]:
        out = tmp_path / name
        import shutil

        shutil.copytree(tmp_path / "b", out)
        train(fresh_net(), Synthetic(40), cfg(out, resume="auto", resume_with_changes=True, **{**conf, **change}))
        return [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]

    same = resumed("same")
    faster = resumed("faster", lr=1e-2)
    assert [r["step"] for r in faster] == [r["step"] for r in same] == list(range(1, 16))
    assert [r["lr"] for r in faster[:7]] == [r["lr"] for r in same[:7]]  # the first segment, as it was
    # the new rate's schedule from the saved step (both end at the same absolute min_lr)
    assert all(f["lr"] == pytest.approx(10 * s["lr"], rel=0.01) for f, s in zip(faster[7:11], same[7:11]))
    assert faster[-1]["lr"] == same[-1]["lr"]
    decayed = resumed("decayed", weight_decay=0.5)
    groups = load_checkpoint(tmp_path / "decayed" / "run" / CHECKPOINT_NAME)["trainer"]["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.5}  # no decay on norms and biases, the new decay elsewhere
    assert [r["loss"] for r in decayed[7:]] != [r["loss"] for r in same[7:]]
    with pytest.raises(CheckpointError, match="optim.optimizer 'sgd'.*resume with --optim.optimizer adamw"):
        train(fresh_net(), Synthetic(40), cfg(tmp_path / "b", resume="auto", resume_with_changes=True,
                                              **{**conf, "optimizer": "sgd"}))


def test_a_resume_is_taught_by_the_teacher_its_run_was(tmp_path):
    """distill.teacher 'largest' copies the largest anchor of the network as built, before a resume loads
    its weights: resumed from a network built the same way the run is exact; built otherwise (other
    weights, another seed), the teacher would differ with no setting changed (found by review): refused
    in one line, or recorded as a change with --resume-with-changes."""
    conf = dict(epochs=3, ckpt_every=4, lr=1e-3, warmup_steps=3, distill="largest", distill_alpha=0.5, init_images=0)
    a = fresh_net()
    train(a, Synthetic(40), cfg(tmp_path / "a", **conf))
    train(fresh_net(), Synthetic(40), cfg(tmp_path / "b", **conf), stop_after=7)
    with pytest.raises(CheckpointError, match="with another teacher.*the same seed\\), or add --resume-with-changes"):
        train(fresh_net(seed=123), Synthetic(40), cfg(tmp_path / "b", resume="auto", **conf))
    c = fresh_net()
    train(c, Synthetic(40), cfg(tmp_path / "b", resume="auto", **conf))
    assert _same_weights(a, c)
    train(fresh_net(), Synthetic(40), cfg(tmp_path / "c", **conf), stop_after=7)
    train(fresh_net(seed=123), Synthetic(40), cfg(tmp_path / "c", resume="auto", resume_with_changes=True, **conf))
    segments = json.loads((tmp_path / "c" / "run" / "train_config.json").read_text())["segments"]
    assert any(c.startswith("the teacher: another teacher") for c in segments[-1]["changes"])


def test_a_resume_with_another_batch_size_goes_on_in_its_epoch(tmp_path):
    """Stopped at step 7 of an epoch of 10 batches of 8 (56 images seen); resumed with batches of 16, as
    an out-of-memory error suggests: the epoch goes on at its 4th batch of 16 (the 57th image on), ends a
    step later and every later epoch ends where it should, each with its validation (the saved batch
    count of the old size skipped the whole epoch and no epoch ever ended again: found by review), the
    last one included (the run ended after 20 steps, 4 epochs' worth of batches of 16, 2 batches into
    its 4th epoch: found by review)."""
    conf = dict(epochs=4, lr=1e-3, warmup_steps=3, batch_size=8, init_images=0)
    val = Synthetic(16, seed=5)
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **conf), stop_after=7, val_data=val)
    r = train(fresh_net(), Synthetic(80), cfg(tmp_path, resume="auto", resume_with_changes=True, **{**conf, "batch_size": 16}),
              val_data=val)
    assert r.finished and r.step == r.total_steps == 23  # 7 of 8, then 1 + 3 epochs of 5 batches of 16
    assert [e["step"] for e in r.evals] == [8, 13, 18, 23] and [e["epoch"] for e in r.evals] == [1, 2, 3, 4]
    saved = load_checkpoint(r.checkpoint)
    assert (saved["epoch"], saved["epoch_step"]) == (4, 0)


@pytest.mark.parametrize("epochs", [2, 1])
def test_an_epoch_a_resume_with_a_larger_batch_ends_is_evaluated(tmp_path, epochs):
    """Stopped at step 5 of an epoch of 6 batches of 8 (40 images seen), resumed with batches of 16: no batch of
    16 is left in the epoch, so the resume ends it, and its evaluation was never made (found by review), nor,
    when it was the last epoch, any (the run said it had finished). Made as the run goes on, or before it ends."""
    conf = dict(epochs=epochs, lr=1e-3, warmup_steps=1, batch_size=8, init_images=0)
    val = Synthetic(16, seed=5)
    train(fresh_net(), Synthetic(48), cfg(tmp_path, **conf), stop_after=5, val_data=val)
    r = train(fresh_net(), Synthetic(48), cfg(tmp_path, resume="auto", resume_with_changes=True,
                                              **{**conf, "batch_size": 16}), val_data=val)
    want = [(5, 1), (8, 2)][:epochs]  # (step, epochs done): then epoch 2's 3 batches of 16
    assert r.finished and r.step == want[-1][0] and [(e["step"], e["epoch"]) for e in r.evals] == want
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [(e["step"], e["epoch"]) for e in rows] == want and (tmp_path / "run" / "final").is_dir()
    again = train(fresh_net(), Synthetic(48), cfg(tmp_path, resume="auto", resume_with_changes=True,
                                                  **{**conf, "batch_size": 16}), val_data=val)
    assert again.finished and again.evals == ()  # nothing left to train, nothing evaluated twice


def test_validation_at_each_epochs_end_does_not_change_what_is_trained(tmp_path):
    """A run with val_data trains the weights the same run without it does: each evaluation's loader drew its
    seed from torch's generator, which the training draws from (random erasing here, drop-path), so the
    validation changed the trained network (found by review)."""
    conf = dict(epochs=2, lr=1e-3, init_images=0, re_prob=0.5, re_splits=2)
    a, b = fresh_net(), fresh_net()
    train(a, Synthetic(40), cfg(tmp_path / "a", **conf))
    r = train(b, Synthetic(40), cfg(tmp_path / "b", **conf), val_data=Synthetic(16, seed=5))
    assert [e["step"] for e in r.evals] == [5, 10]
    assert _same_weights(a, b)


def test_a_resume_on_fewer_images_than_its_epoch_had_seen_goes_on_with_the_next_epoch(tmp_path):
    """Stopped at step 7 of an epoch of 10 batches, resumed on 40 images (5 batches; --data.limit lowered, or
    images gone from the folder): the position (epoch 0, batch 7) was kept, so no epoch ever ended again (no
    validation, every step logged in epoch 0, the last checkpoint at batch 15 of 5: found by review). The
    run goes on with the next epoch, evaluates the one the resume ended, and trains the epochs left."""
    conf = dict(epochs=3, lr=1e-3, init_images=0)
    val = Synthetic(16, seed=5)
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **conf), stop_after=7, val_data=val)
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf), val_data=val)
    assert r.finished and r.step == 17 and [e["epoch"] for e in r.evals] == [1, 2, 3]  # then epochs 1, 2 of 5 batches
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows[7:]] == [1] * 5 + [2] * 5
    saved = load_checkpoint(r.checkpoint)
    assert (saved["epoch"], saved["epoch_step"]) == (3, 0)


def test_a_resume_with_a_larger_batch_trains_the_epochs_left(tmp_path):
    """Stopped at step 7 of 3 epochs of 5 batches of 8 (1.4 epochs done), resumed with batches of 16: the
    run said it had finished (7 steps >= 3 epochs of 2 batches) and wrote final/ untrained further (found
    by review). It trains the 1.6 epochs left, the per-epoch rate of each as a run with batches of 16 has it."""
    conf = dict(epochs=3, lr=1e-3, warmup_steps=1, unit="epoch", batch_size=8, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path / "a", **conf), stop_after=7)
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path / "a", resume="auto", resume_with_changes=True,
                                              **{**conf, "batch_size": 16}))
    assert r.finished and r.step == 10 and len(r.stitches) == 3  # epoch 1's second batch of 16, epoch 2's two
    train(fresh_net(), Synthetic(40), cfg(tmp_path / "b", **{**conf, "batch_size": 16}))  # batches of 16 throughout
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    fresh = [json.loads(ln) for ln in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows[7:]] == [r["lr"] for r in fresh[3:]] and [r["epoch"] for r in rows[7:]] == [1, 2, 2]


def test_going_back_to_a_kept_copy_keeps_it_and_drops_the_abandoned_later_ones(tmp_path):
    """Resumed from checkpoints/step-4 (the run went wrong after it) with another rate: the copies of the
    abandoned steps 5-6 go, as their lines of metrics.jsonl do, and the copy gone back to stays (the
    rotation kept the two highest steps, step 6 of the abandoned part among them: found by review)."""
    conf = dict(epochs=2, ckpt_every=2, keep_checkpoints=2, lr=1e-3, init_images=0)
    run = tmp_path / "run"
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **conf), stop_after=6)
    copies = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert copies() == ["step-00000004.pt", "step-00000006.pt"]
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **{**conf, "lr": 1e-4}, resume=str(run / "checkpoints" / "step-00000004.pt"),
                                          resume_with_changes=True), stop_after=5)
    assert copies() == ["step-00000004.pt", "step-00000005.pt"]
    assert _steps(run) == [1, 2, 3, 4, 5]


def test_going_back_without_validation_drops_the_abandoned_evaluations_as_with_it(tmp_path):
    """Resumed from checkpoints/step-2 without validation: evals.jsonl kept the evaluations of steps 4 and 8,
    which the run goes back before (found by review); they are dropped as with validation, where each is made
    again. A run without validation writes no evals.jsonl."""
    conf = dict(epochs=2, ckpt_every=2, keep_checkpoints=5, init_images=0)
    run, val = tmp_path / "run", Synthetic(16, seed=5)
    evals = lambda: [json.loads(ln)["step"] for ln in (run / "evals.jsonl").read_text().splitlines()]  # noqa: E731
    train(fresh_net(), Synthetic(32), cfg(tmp_path, **conf), val_data=val)
    assert evals() == [4, 8]
    back = str(run / "checkpoints" / "step-00000002.pt")
    train(fresh_net(), Synthetic(32), cfg(tmp_path, resume=back, **conf), val_data=val, stop_after=5)
    assert evals() == [4]  # with validation: step 8's dropped, step 4's made again
    train(fresh_net(), Synthetic(32), cfg(tmp_path, resume=back, **conf), stop_after=3)
    assert evals() == [] and _steps(run) == [1, 2, 3]  # without: the same rows dropped
    train(fresh_net(), Synthetic(32), cfg(tmp_path / "none", **conf), stop_after=1)
    assert not (tmp_path / "none" / "run" / "evals.jsonl").exists()


def test_going_back_with_fewer_checkpoints_kept_drops_the_abandoned_copies(tmp_path):
    """Gone back to checkpoints/step-2 with --keep-checkpoints 1 (to save space): the copies of the abandoned
    steps 4 and 6 stayed, and with checkpoint.pt gone the way back offered was step 6, after the run's own
    step 3 (found by review)."""
    from snnet.runlock import check_run_folder
    from snnet.errors import RunFolderError

    conf = dict(epochs=2, ckpt_every=2, keep_checkpoints=3, lr=1e-3, init_images=0)
    run = tmp_path / "run"
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **conf), stop_after=6)
    train(fresh_net(), Synthetic(80), cfg(tmp_path, **{**conf, "keep_checkpoints": 1},
                                          resume=str(run / "checkpoints" / "step-00000002.pt")), stop_after=3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]
    (run / CHECKPOINT_NAME).unlink()
    with pytest.raises(RunFolderError, match="--resume .*step-00000002.pt,"):
        check_run_folder(run, "auto")


def test_a_full_disk_when_a_resume_rewrites_metrics_keeps_them(tmp_path, monkeypatch):
    """A resume drops the lines of the steps after its checkpoint by rewriting metrics.jsonl in place: a
    full disk then left it empty (every step's record of the run lost) and stopped with an OSError
    traceback (found by review). The rewrite is atomic and the failure one line."""
    import errno

    from snnet.errors import TrainingError

    conf = dict(epochs=2, init_images=0, **OPT)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=4)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 2.0}\n')  # a step after the checkpoint (killed before the next one)
    before = metrics.read_text()
    real = Path.write_text

    def full(self: Path, *a, **k):
        if "metrics" in self.name:
            open(self, "w").close()  # truncated, then nothing fits
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(TrainingError, match="cannot write .*metrics.jsonl \\(No space left on device\\); it and the"):
        train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert metrics.read_text() == before
    monkeypatch.undo()
    train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert _steps(tmp_path / "run") == list(range(1, 11))


def test_a_garbled_metrics_line_does_not_stop_a_resume(tmp_path):
    """A crash mid-write can leave bytes that are not UTF-8 at the end of metrics.jsonl: the resume drops
    the line as it drops a torn one (it was a UnicodeDecodeError traceback)."""
    conf = dict(epochs=2, init_images=0, **OPT)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=4)
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": \xff\xfe garbage\n')
    train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert _steps(tmp_path / "run") == list(range(1, 11))


# ---------------------------------------------------------------------------- --seed


def test_the_same_arguments_give_the_same_losses_from_step_one(tmp_path):
    """Random-init anchors and timm's random augmentation both follow --seed."""
    data = _image_folder(tmp_path / "imgs")

    def losses(name: str, seed: int) -> list[float]:
        out = tmp_path / name
        assert _cli(*_train_args(data, out, "--max-steps", "3", "--augment", "--seed", str(seed))) == 0
        return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]

    first = losses("a", 0)
    torch.rand(7), random.random(), np.random.rand()  # whatever ran before must not matter
    assert losses("b", 0) == first
    assert losses("c", 1)[0] != first[0]


def test_mid_epoch_resume_with_loader_workers_is_exact(tmp_path):
    """Each image's augmentation is a function of (seed, epoch, index): a run with 2 workers resumed
    mid-epoch equals one uninterrupted, and both equal a run with no workers."""
    folder = _image_folder(tmp_path / "imgs")  # 20 images: 5 steps an epoch of 4
    data = build_dataset(str(folder), "train", fresh_net().anchors[0].data_config, augment=True)
    conf = dict(epochs=2, batch_size=4, init_images=8, num_workers=2)
    a = fresh_net()
    train(a, data, cfg(tmp_path / "a", **conf, **OPT))
    part = train(fresh_net(), data, cfg(tmp_path / "b", **conf, **OPT), stop_after=3)
    assert (load_checkpoint(part.checkpoint)["epoch"], load_checkpoint(part.checkpoint)["epoch_step"]) == (0, 3)
    b = fresh_net(seed=7)
    train(b, data, cfg(tmp_path / "b", resume="auto", **conf, **OPT))
    assert _same_weights(a, b)
    c = fresh_net()
    train(c, data, cfg(tmp_path / "c", **{**conf, "num_workers": 0}, **OPT))
    assert _same_weights(a, c)


# ---------------------------------------------------------------------------- checksums


def _flip(raw: bytearray, at: int) -> bytearray:
    raw[at:at + 4] = bytes(b ^ 0x5A for b in raw[at:at + 4])
    return raw


def _flip_checkpoint_tensor(path: Path) -> None:
    """Flip bytes in the middle of the largest tensor stored in a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header's own lengths (torch pads it)
    path.write_bytes(_flip(raw, start + info.file_size // 2))


def _flip_safetensors_tensor(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(_flip(raw, (data_start + len(raw)) // 2))


@pytest.fixture
def finished_run(tmp_path) -> tuple[Path, Path]:
    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    assert _cli(*_train_args(data, out, "--max-steps", "2")) == 0
    return data, out


def test_flipped_bytes_in_a_checkpoint_are_refused(finished_run, capsys):
    data, out = finished_run
    ckpt = out / CHECKPOINT_NAME
    _flip_checkpoint_tensor(ckpt)
    torch.load(ckpt, weights_only=True)  # torch itself notices nothing
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(ckpt)
    capsys.readouterr()
    # extending a finished run is asked for explicitly (else refused before the checkpoint is read)
    assert _cli(*_train_args(data, out, "--max-steps", "4", "--resume", "auto", "--resume-with-changes")) == 2
    assert f"checkpoint {ckpt} is damaged" in _one_line(capsys.readouterr().err)


def test_flipped_bytes_in_saved_weights_are_refused_by_every_loader(finished_run, tmp_path, capsys):
    from safetensors.torch import load_file

    data, out = finished_run
    final = out / "final"
    stitch = export_stitch(snnet.load(final), 3, tmp_path / "stitch", ["safetensors"])["model.safetensors"]
    weights = final / "model.safetensors"
    _flip_safetensors_tensor(weights)
    _flip_safetensors_tensor(stitch)
    load_file(str(weights))  # safetensors itself notices nothing
    with pytest.raises(CheckpointError, match=f"{weights} is damaged"):
        snnet.load(final)
    with pytest.raises(CheckpointError, match=f"{stitch} is damaged"):
        load_stitch(stitch.parent)
    capsys.readouterr()
    for args in (["eval", "--model", str(final), "--data", str(data), "--out", str(tmp_path / "e")],
                 ["export", "--model", str(final), "--stitch", "1", "--format", "safetensors", "--out", str(tmp_path / "x")],
                 ["select", "flops<=1G", "--model", str(final)],
                 ["profile", "--model", str(final), "--out", str(tmp_path / "p")],
                 _train_args(data, tmp_path / "again", "--init", str(final))):
        assert _cli(*args) == 2, args
        assert f"{weights} is damaged" in _one_line(capsys.readouterr().err), args


def test_files_written_before_checksums_still_load(finished_run, tmp_path):
    """No checksum, no claim of verification: the file loads as it did."""
    _, out = finished_run
    final = out / "final"
    stitch = export_stitch(snnet.load(final), 3, tmp_path / "stitch", ["safetensors"])["model.safetensors"]
    for config in (final / "config.json", stitch.parent / "config.json"):
        cfg_ = json.loads(config.read_text())
        assert set(cfg_.pop("sha256")) == {"model.safetensors"}
        config.write_text(json.dumps(cfg_))
    snnet.load(final)
    load_stitch(stitch.parent)
    ckpt = out / CHECKPOINT_NAME
    state = torch.load(ckpt, weights_only=True)
    del state["sha256"]
    torch.save(state, ckpt)
    assert load_checkpoint(ckpt)["step"] == 2


def test_a_damaged_checkpoint_header_is_one_line_without_unsafe_advice(finished_run, capsys):
    data, out = finished_run
    ckpt = out / CHECKPOINT_NAME
    ckpt.write_bytes(b"\0" * 64 + ckpt.read_bytes()[64:])
    capsys.readouterr()
    assert _cli(*_train_args(data, out, "--max-steps", "4", "--resume", "auto")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} is corrupt" in line and "weights_only" not in line


# ---------------------------------------------------------------------------- resuming with other settings


def _bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_resume_with_changed_settings_is_refused_naming_each_unless_asked_and_keeps_the_history(tmp_path, capsys,
                                                                                                    monkeypatch):
    """The issue's line: a finished run resumed with another rate, length and label smoothing. Refused in one
    line naming each change (nothing touched); the printed command, run for real, continues it and
    train_config.json then holds both segments."""
    import shlex

    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    assert _cli(*_train_args(data, out, "--max-steps", "2")) == 0
    before = _bytes(out)
    capsys.readouterr()
    built: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(snnet.StitchedNet, "__init__", lambda *a, **k: built.append(1))
        assert _cli(*_train_args(data, out, "--resume", "auto", "--lr", "5", "--max-steps", "4",
                                 "--set", "label_smoothing=0.9")) == 2
    assert not built  # refused before the network was built
    line = _one_line(capsys.readouterr().err)
    assert "holds a finished run (2 of 2 steps)" in line
    for change in ("optim.lr: 0.0004 -> 5 (used: 3.125e-06 -> 0.0390625)", "schedule.max_steps: 2 -> 4",
                   "data.label_smoothing: 0.1 -> 0.9"):
        assert change in line, change
    assert _bytes(out) == before  # nothing trained, nothing rewritten
    command = shlex.split(line.split("(the command: ")[1].rstrip(")"))
    assert command[:2] == ["snnet", "train"] and command[-3:] == ["--resume", "auto", "--resume-with-changes"]
    assert _cli(*command[1:]) == 0  # the printed command works
    assert _steps(out) == [1, 2, 3, 4]
    segments = json.loads((out / "train_config.json").read_text())["segments"]
    assert [s["from_step"] for s in segments] == [0, 2] and "changes" not in segments[0]
    assert segments[0]["config"]["optim"]["lr"] == 4e-4 and segments[1]["config"]["optim"]["lr"] == 5
    assert any(c.startswith("schedule.max_steps: 2 -> 4") for c in segments[1]["changes"])


def test_a_refused_resume_from_another_folder_names_the_run_the_checkpoint_came_from(tmp_path):
    """--resume a/checkpoint.pt --out b with another rate: the refusal said b held a finished run and offered
    --model.init b/final, which does not exist (found by review); it names a, from its checkpoint or a kept copy."""
    conf = dict(max_steps=2, ckpt_every=1, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for checkpoint, change, says in [(a / CHECKPOINT_NAME, dict(lr=1e-3), f"{a} holds a finished run"),
                                     (a / CHECKPOINT_NAME, dict(optimizer="sgd"), "optim.optimizer 'sgd'"),
                                     (a / "checkpoints" / "step-00000001.pt", dict(optimizer="sgd"), "'sgd'")]:
        with pytest.raises(CheckpointError) as refused:
            check_resume(cfg(tmp_path / "b", resume=str(checkpoint), **{**conf, **change}))
        said = str(refused.value)
        assert says in said and f"--model.init {a / 'final'}" in said and str(b) not in said, said
    assert not b.exists()


def test_a_refusal_offers_the_network_of_an_unfinished_run_only_once_it_exists(tmp_path):
    """The wrong-optimizer refusal of an unfinished run offered --model.init run/final, which it does not have yet
    (found by review): it says the run writes it when it finishes; once it has, it offers it as before."""
    conf = dict(epochs=None, max_steps=2, ckpt_every=1, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path, **conf), stop_after=1)
    out = tmp_path / "run"
    assert not (out / "final").exists()
    with pytest.raises(CheckpointError, match=f"or once the run has finished \\(resumed in {out} with its own settings; "
                                              f"it then writes its network to {out / 'final'}\\), start a new run"):
        check_resume(cfg(tmp_path, resume="auto", optimizer="sgd", **conf))
    train(fresh_net(), Synthetic(16), cfg(tmp_path, resume="auto", **conf))
    with pytest.raises(CheckpointError, match=f"or start a new run from its network with --model.init {out / 'final'} "
                                              "and another --out$"):
        check_resume(cfg(tmp_path, resume="auto", optimizer="sgd", **conf))


def test_a_resume_into_another_folder_keeps_the_history_of_the_run_the_checkpoint_came_from(tmp_path):
    """--resume a/checkpoint.pt --out b read the settings' history from b (none there): b's train_config.json began
    at step 0 with a's last rate, and a's first segment (steps 0-2 at 5e-5) was lost. b holds a's segments (here
    resumed from a copy a kept, step 3: both segments trained some of its steps)."""
    conf = dict(epochs=None, ckpt_every=1, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", max_steps=2, **conf))
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", max_steps=4, lr=1e-3, resume="auto", resume_with_changes=True,
                                          **conf))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", max_steps=4, lr=1e-3,
                                          resume=str(a / "checkpoints" / "step-00000003.pt"), **conf))
    history = json.loads((a / "train_config.json").read_text())["segments"]
    assert [(s["from_step"], s["config"]["optim"]["lr"]) for s in history] == [(0, 5e-5), (2, 1e-3)]
    assert json.loads((b / "train_config.json").read_text())["segments"] == history


def test_a_resume_into_another_folder_carries_the_logs_of_the_run_up_to_its_checkpoint(tmp_path):
    """--resume a/checkpoint.pt --out b began b's metrics.jsonl and evals.jsonl at the checkpoint's step, while its
    train_config.json holds a's segments from step 0: the curve of a's first steps and their evaluation were in a
    only. b's logs hold a's rows up to the checkpoint (resumed from a copy a kept, step 2: a's later rows are not b's)."""
    conf = dict(epochs=2, ckpt_every=1, init_images=0)
    val = Synthetic(8, seed=5)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf), stop_after=3, val_data=val)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert _steps(a) == [1, 2, 3]
    r = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume=str(a / "checkpoints" / "step-00000002.pt"), **conf),
              val_data=val)
    assert r.finished and _steps(b) == [1, 2, 3, 4]
    assert (b / "metrics.jsonl").read_text().splitlines()[:2] == (a / "metrics.jsonl").read_text().splitlines()[:2]
    assert [json.loads(ln)["step"] for ln in (b / "evals.jsonl").read_text().splitlines()] == [2, 4]
    assert _steps(a) == [1, 2, 3]  # a is left as it was


def _tb_losses(tb: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train/loss event in ``tb``'s event files, as they were written (no purge applied)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(e.step, v.simple_value) for path in sorted(tb.glob("events.out.tfevents.*"))
            for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == "train/loss"]


def test_a_resume_into_another_folder_carries_the_tensorboard_curve_of_the_run_up_to_its_checkpoint(tmp_path):
    """--resume a/checkpoint.pt --out b carried a's metrics.jsonl and evals.jsonl into b, not its TensorBoard event
    files: TensorBoard on b showed the curve from the checkpoint on. b holds a's events up to the checkpoint (here a
    copy a kept, step 2), not a's step 3 (copied whole, a reader that does not apply b's purge showed step 3 twice);
    a is left as it was."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    conf = dict(epochs=None, max_steps=4, ckpt_every=1, init_images=0, tensorboard=True)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf), stop_after=3)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    before = _bytes(a)
    assert [s for s, _ in _tb_losses(a / "tb")] == [1, 2, 3]
    r = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume=str(a / "checkpoints" / "step-00000002.pt"), **conf))
    assert r.finished and _bytes(a) == before
    assert [s for s, _ in _tb_losses(b / "tb")] == [1, 2, 3, 4]
    assert _tb_losses(b / "tb")[:2] == _tb_losses(a / "tb")[:2]
    shown = EventAccumulator(str(b / "tb"))
    shown.Reload()  # TensorBoard's view of b: the whole run, each step once
    assert [e.step for e in shown.Scalars("train/loss")] == [1, 2, 3, 4]
    # a finished run, since trained further, resumed into c from its copy at the end (nothing to train: c's writer
    # records no purge): c shows its curve up to that copy, not the later step, nor the later resume's file
    d, c = tmp_path / "d" / "run", tmp_path / "c" / "run"
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "d", **{**conf, "max_steps": 2}))
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "d", resume="auto", resume_with_changes=True, **{**conf, "max_steps": 3}))
    assert [s for s, _ in _tb_losses(d / "tb")] == [1, 2, 3] and len(list((d / "tb").iterdir())) == 2
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "c", resume=str(d / "checkpoints" / "step-00000002.pt"),
                                          **{**conf, "max_steps": 2}))
    assert [s for s, _ in _tb_losses(c / "tb")] == [1, 2] and len(list((c / "tb").iterdir())) == 1


def test_a_resume_into_another_folder_that_failed_before_its_first_checkpoint_is_retried_by_the_same_command(
        tmp_path, monkeypatch):
    """--resume a/checkpoint.pt --out b that failed after writing b's train_config.json, before b's first checkpoint
    (here: the copy of a's logs), could not be retried: the same command was refused (b 'already holds an
    unfinished training run') and --resume auto --out b started a fresh run over a's copied history. The same command
    now takes b over; auto says to run it; b holding anything else is refused as before."""
    import snnet.train as train_module

    conf = dict(epochs=None, max_steps=4, ckpt_every=1, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf), stop_after=2)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    resume = cfg(tmp_path / "b", resume=str(a / CHECKPOINT_NAME), **conf)

    def full_disk(*args, **kwargs):
        raise TrainingError("cannot copy: no space left on device")

    with monkeypatch.context() as m:
        m.setattr(train_module, "_carry_logs", full_disk)
        with pytest.raises(TrainingError, match="no space left"):
            train(fresh_net(), Synthetic(16), resume)
    assert (b / "train_config.json").is_file() and not (b / CHECKPOINT_NAME).exists()
    with pytest.raises(RunFolderError, match=f"--resume auto: {b} holds the start of a resume of {a / CHECKPOINT_NAME}"):
        check_run_folder(b, "auto")
    r = train(fresh_net(), Synthetic(16), resume)
    assert r.finished and _steps(b) == [1, 2, 3, 4]
    history = json.loads((a / "train_config.json").read_text())["segments"]
    assert json.loads((b / "train_config.json").read_text())["segments"] == history
    # a folder holding more than such a start (a checkpoint of its own), or another checkpoint's start, is refused
    with pytest.raises(RunFolderError, match="already holds a finished training run"):
        check_run_folder(b, str(a / CHECKPOINT_NAME))
    c = tmp_path / "c" / "run"
    with monkeypatch.context() as m:
        m.setattr(train_module, "_carry_logs", full_disk)
        with pytest.raises(TrainingError):
            train(fresh_net(), Synthetic(16), cfg(tmp_path / "c", resume=str(a / CHECKPOINT_NAME), **conf))
    with pytest.raises(RunFolderError, match="already holds an unfinished training run"):
        check_run_folder(c, str(a / "checkpoints" / "step-00000001.pt"))
    (c / "notes.txt").write_text("mine")  # not a run entry: b's start is still only the resume's
    (c / "tb").mkdir()
    (c / "tb" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="already holds an unfinished training run"):
        check_run_folder(c, str(a / CHECKPOINT_NAME))


def test_a_finished_run_resumed_into_another_folder_is_held_there_as_an_unfinished_ones_resume_is(tmp_path):
    """--resume a/checkpoint.pt --out b of a run that had ended wrote only b/final: b had no checkpoint, settings or
    logs (an unfinished run's resume into b leaves them all), and `--resume auto --out b`, which the command then
    offers to train it further, was refused. b holds the run as it ended, a is left as it was."""
    conf = dict(epochs=None, max_steps=2, ckpt_every=1, init_images=0)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    before = _bytes(a)
    r = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume=str(a / CHECKPOINT_NAME), **conf))
    assert r.finished and not r.stitches and r.checkpoint == b / CHECKPOINT_NAME and r.final_dir == b / "final"
    assert _bytes(a) == before
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    assert json.loads((b / "train_config.json").read_text())["segments"] == \
        json.loads((a / "train_config.json").read_text())["segments"]
    assert state_digest(load_checkpoint(b / CHECKPOINT_NAME)) == state_digest(load_checkpoint(a / CHECKPOINT_NAME))
    assert _same_weights(snnet.load(b / "final"), snnet.load(a / "final"))
    again = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume="auto", **conf))
    assert again.finished and again.checkpoint == b / CHECKPOINT_NAME
    longer = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume="auto", resume_with_changes=True,
                                                   **{**conf, "max_steps": 3}))
    assert longer.step == 3 and _steps(b) == [1, 2, 3]
    # from a copy kept at the end of a's first schedule, since trained further: b holds a's run as it was then
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "c", resume=str(b / "checkpoints" / "step-00000002.pt"), **conf))
    c = tmp_path / "c" / "run"
    assert _steps(c) == [1, 2] and load_checkpoint(c / CHECKPOINT_NAME)["step"] == 2
    assert [s["from_step"] for s in json.loads((c / "train_config.json").read_text())["segments"]] == [0]


def test_a_finished_run_resumed_with_changes_and_nothing_to_train_records_no_segment(tmp_path):
    """A finished run resumed with --resume-with-changes (another rate) and no longer schedule trains nothing: in its
    own folder train_config.json was left as it was, but resumed into b, b's recorded a segment of the new rate from
    the last step that trained no step (the next resume dropped it). b holds the run as it ended, a's segments, as a
    resume in a's folder leaves a's; so from a copy kept at the end of a first schedule since trained further."""
    conf = dict(epochs=None, max_steps=2, ckpt_every=1, init_images=0)
    changed = dict(resume_with_changes=True, **{**conf, "lr": 1e-3})
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", **conf))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    segments = lambda run: json.loads((run / "train_config.json").read_text())["segments"]  # noqa: E731
    before = _bytes(a)
    assert train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", resume="auto", **changed)).finished
    assert _bytes(a) == before
    r = train(fresh_net(), Synthetic(16), cfg(tmp_path / "b", resume=str(a / CHECKPOINT_NAME), **changed))
    assert r.finished and not r.stitches and segments(b) == segments(a)
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "a", resume="auto", **{**changed, "max_steps": 3}))
    assert [s["from_step"] for s in segments(a)] == [0, 2]
    c = tmp_path / "c" / "run"
    train(fresh_net(), Synthetic(16), cfg(tmp_path / "c", resume=str(a / "checkpoints" / "step-00000002.pt"),
                                          **{**changed, "lr": 2e-3}))
    assert segments(c) == segments(b)


def test_a_finished_run_resumed_with_a_batch_size_that_ends_its_epoch_trains_evaluates_and_records_nothing(tmp_path):
    """A run that ended at its max_steps 5 of an epoch of 6 batches of 8, resumed in its own folder with
    --resume-with-changes and batches of 16: no batch of 16 is left in the epoch, so the resume ends it, and the run,
    finished, still evaluated that epoch and recorded a segment of batches of 16 from step 5 that trained no step,
    and rewrote its checkpoint (as resumed into another folder before 71b7d8d). It is held as it ended: nothing
    trained, evaluated or rewritten; into another folder b holds it as it ended too, a's segments alone."""
    conf = dict(epochs=None, max_steps=5, lr=1e-3, warmup_steps=1, batch_size=8, init_images=0)
    changed = dict(resume_with_changes=True, **{**conf, "batch_size": 16})
    val = Synthetic(16, seed=5)
    train(fresh_net(), Synthetic(48), cfg(tmp_path / "a", **conf), val_data=val)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    before = _bytes(a)
    r = train(fresh_net(), Synthetic(48), cfg(tmp_path / "a", resume="auto", **changed), val_data=val)
    assert r.finished and r.step == 5 and not r.stitches and r.evals == ()
    assert _bytes(a) == before
    r = train(fresh_net(), Synthetic(48), cfg(tmp_path / "b", resume=str(a / CHECKPOINT_NAME), **changed), val_data=val)
    assert r.finished and not r.stitches and r.evals == () and not (b / "evals.jsonl").read_text()
    assert json.loads((b / "train_config.json").read_text())["segments"] == \
        json.loads((a / "train_config.json").read_text())["segments"]


def test_an_unfinished_run_resumed_with_other_settings(tmp_path):
    conf = dict(epochs=2, init_images=0, **OPT)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=3)
    with pytest.raises(CheckpointError, match=r"cannot resume .* \(optim.lr: 0.001 -> 0.002; "
                                              r"sampling.sampler: \"uniform\" -> \"flops_bucketed\"\)"):
        train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **{**conf, "lr": 2e-3}, sampler="flops_bucketed"))
    # what does not change the result may change: the folder's display options, the loader's processes
    done = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", log_every=1, num_workers=1, **conf))
    assert done.finished and len(json.loads((tmp_path / "run" / "train_config.json").read_text())["segments"]) == 1


# ---------------------------------------------------------------------------- the last checkpoints, a full disk


def test_the_last_checkpoints_are_kept_and_an_earlier_one_resumes_exactly(tmp_path, capsys):
    conf = dict(epochs=2, ckpt_every=2, keep_checkpoints=3, **OPT)  # 5 steps an epoch: checkpoints at 2, 4, 6, 8, 10
    a = fresh_net()
    train(a, Synthetic(40), cfg(tmp_path, **conf))
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000006.pt", "step-00000008.pt", "step-00000010.pt"]
    assert (run / "checkpoints" / "step-00000010.pt").samefile(run / CHECKPOINT_NAME)  # the latest costs no copy
    # going back to step 6 redoes 7..10 to the very same weights
    b = fresh_net(seed=5)
    again = train(b, Synthetic(40), cfg(tmp_path, resume=str(run / "checkpoints" / "step-00000006.pt"), **conf))
    assert again.finished and again.step == 10 and len(again.stitches) == 4 and _same_weights(a, b)
    assert _steps(run) == list(range(1, 11))
    # a damaged latest checkpoint points at the copy to go back to
    _flip_checkpoint_tensor(run / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"resume from an earlier copy \(--resume .*step-00000008.pt\)"):
        load_checkpoint(run / CHECKPOINT_NAME)


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    import errno

    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    saves = []
    real_save = torch.save

    def full_after_one(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 1:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_one)
    assert _cli(*_train_args(data, out, "--max-steps", "6", "--ckpt-every", "2")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "the previous checkpoint is intact" in line
    monkeypatch.undo()
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2 and _temps(out) == []


# ---------------------------------------------------------------------------- training inputs, in one line


@pytest.mark.parametrize("args, says", [
    (["--lr", "-1"], "optim.lr must be > 0 and finite, got -1"),  # what was typed, not the rate scaled from it
    (["--data", "FILE"], "FILE is a file, not a dataset"),
    (["--routes", "FOLDER"], "--routes FOLDER is a folder"),
])
def test_bad_training_inputs_say_what_is_wrong(tmp_path, capsys, args, says):
    afile, folder = tmp_path / "afile", tmp_path / "afolder"
    afile.write_text("x")
    folder.mkdir()
    args = [a.replace("FILE", str(afile)).replace("FOLDER", str(folder)) for a in args]
    assert _cli("train", *args, "--out", str(tmp_path / "o")) == 2
    line = _one_line(capsys.readouterr().err)
    assert says.replace("FILE", str(afile)).replace("FOLDER", str(folder)) in line and "-0.125" not in line


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell starts children with Ctrl-C ignored


def test_ctrl_c_while_snnet_loads_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "snnet", "train", "--out", str(tmp_path / "o")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    # Ctrl-C once torch's library is mapped: snnet is importing torch (seconds of work). Earlier, while Python
    # itself starts (its site module), an interrupt ends the interpreter before any code of snnet runs
    # ("Fatal Python error: init_import_site", exit 1) -- nothing a program can catch; a busy machine makes
    # that window long, so a fixed delay made this test fail there.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text(errors="ignore"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and _one_line(err) == "error: interrupted"


@pytest.mark.slow
def test_the_printed_resume_command_works_when_run(tmp_path):
    """Ctrl-C a run started with --config, --set and old and new options; run the command it prints."""
    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    (tmp_path / "more.yaml").write_text("data:\n  label_smoothing: 0.2\n")
    # 40 steps: the Ctrl-C lands within 0.2 s of step 3, far before the last; the resume trains the rest, and each
    # step costs the suite time (120 made this its slowest test)
    args = [sys.executable, "-m", "snnet", *_train_args(data, out, "--epochs", "1000", "--max-steps", "40", "--ckpt-every", "5",
                                                        "--config", str(tmp_path / "more.yaml"),
                                                        "--set", "weight_decay=0.01", "--optim.anchor-lr-scale", "0.5")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=_sigint_default)
    err = _signal_after_steps(first, out, signal.SIGINT)
    assert first.returncode == 130, err
    command = shlex.split(_one_line(err).split("Resume with: ")[1])
    assert command[0] == "snnet"
    again = subprocess.run([sys.executable, "-m", "snnet", *command[1:]], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert _steps(out) == list(range(1, 41)) and (out / "final" / "model.safetensors").is_file()
    config = json.loads((out / "train_config.json").read_text())["segments"]
    assert len(config) == 1 and config[0]["config"]["data"]["label_smoothing"] == 0.2


@pytest.mark.slow
def test_the_launcher_stops_torchrun_in_one_line(tmp_path):
    """SIGTERM to torchrun's agent: the workers checkpoint and print the resume command, and nothing else is said."""
    data, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "snnet.launch", "--nproc_per_node", "2",
                             *_train_args(data, out, "--epochs", "100000", "--ckpt-every", "5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = _signal_after_steps(proc, out, signal.SIGTERM)
    assert proc.returncode == 143, err
    line = _one_line(err)
    assert line.startswith("stopped by SIGTERM") and "python -m snnet.launch --nproc_per_node 2 train" in line
    assert load_checkpoint(out / CHECKPOINT_NAME)["world_size"] == 2


@pytest.mark.parametrize("options, message", [
    (["--nproc_per_node", "0"], "--nproc_per_node 0: give a number of processes >= 1"),
    (["--nproc_per_node", "two"], "--nproc_per_node two: Unsupported nproc_per_node value"),
    (["--nnodes", "0"], "--nnodes 0: give a number of nodes >= 1"),
    (["--nnodes", "3:1"], "--nnodes 3:1"),
])
def test_the_launcher_refuses_a_bad_number_of_processes_in_one_line(options, message, monkeypatch, capsys):
    """torchrun's own checks fail with a traceback (for 0 processes a bare AssertionError); nothing is started."""
    from snnet.launch import LAUNCHER_ENV, main

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    assert main([*options, "train", "--anchors", TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_in_one_line(tmp_path):
    """systemd, Slurm and `timeout` send SIGTERM to the whole process group, the DataLoader's workers
    included: the workers leave it to the main process, which finishes the step, checkpoints and says
    how to resume (a worker killed by it made torch raise anywhere, a backward pass included, in 2 of
    3 runs of a review, before any checkpoint). Two runs: the kernel decides who runs first."""
    data = _image_folder(tmp_path / "imgs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in range(2):
        out = tmp_path / f"run{k}"
        proc = subprocess.Popen([sys.executable, "-m", "snnet", *_train_args(data, out, "--epochs", "100000", "--ckpt-every",
                                                                            "100000", "--data.workers", "2")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        err = _signal_after_steps(proc, out, signal.SIGTERM, steps=3 + 4 * k, group=True)
        assert proc.returncode == 143, err
        assert _one_line(err).startswith("stopped by SIGTERM"), err
        assert load_checkpoint(out / CHECKPOINT_NAME)["step"] >= 3 + 4 * k


_WORKERS_SCRIPT = """
import os, signal, sys, time, torch
from snnet.sampling import WorkerLoader, held_signals, seed_worker

class Items(torch.utils.data.Dataset):
    def __len__(self): return 24
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([i, os.getpgid(0)])

got = []
signal.signal(signal.SIGTERM, lambda *_: got.append("SIGTERM"))
loader = WorkerLoader(Items(), batch_size=4, num_workers=2, worker_init_fn=seed_worker(0, 0))
if sys.argv[1] == "group-sigterm":
    for _ in range(3):
        with held_signals():  # the signal lands while the workers start (or just after)
            batches = iter(loader)
            os.killpg(0, signal.SIGTERM)
        items = torch.cat(list(batches))
        assert sorted(items[:, 0].tolist()) == list(range(24)), items
        assert os.getpgid(0) not in items[:, 1].tolist(), "a worker in the main process's group"
    print(got)
else:
    batches = iter(loader)
    next(batches)
    raise RuntimeError("escaped with the workers alive")
"""


@pytest.mark.parametrize("case", ["group-sigterm", "escape"])
def test_loader_workers_leave_signals_to_the_main_process_and_never_hang_its_exit(tmp_path, case):
    """A SIGTERM sent to the process group while a loader's workers start reaches only the main process
    (before, a worker could die of it, between its start and its init function); and an exception that escapes
    with the workers alive ends the process (before, workers ignored SIGTERM and the interpreter's exit, which
    terminates and joins them, waited for ever: the CI run of 962f39e hung in the test below)."""
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, env=env, timeout=60,
                          start_new_session=True)
    if case == "group-sigterm":
        assert proc.returncode == 0 and proc.stdout.strip() == str(["SIGTERM"] * 3), proc.stderr
    else:
        assert proc.returncode == 1 and "escaped with the workers alive" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- runs written before the tree


def _assert_recorded_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The weights a recorded run ended with, to float rounding (equal on the CPU that recorded them; on another, float kernels
    of another instruction set (AVX-512 and AMX against AVX2) round otherwise in the last bits, and ten steps
    grow that to at most 2.5e-3 of a tensor's largest value (a machine with AMX; the median tensor 1e-7). So
    each tensor within 1e-2 of its largest value: one epoch fewer, the uniform sampler or a learning rate 10 %
    off each leave some tensor more than 1.29 of it away, and the median tensor over 1e-2)."""
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-2 * want[k].abs().max().item() + 1e-12, msg=k)


def test_a_run_written_before_the_configuration_tree_resumes_to_the_old_runs_weights(tmp_path):
    """tests/data/run-v1 was written by snnet at fa1757f: stopped at step 4 of 10, and the weights of the same run
    left uninterrupted. Today's loop resumes the old checkpoint and ends with those weights; run from the start it
    gives them too (exactly on the recording CPU, to float rounding elsewhere: _assert_recorded_weights)."""
    import shutil

    from safetensors.torch import load_file

    old = Path(__file__).parent / "data" / "run-v1"
    shutil.copytree(old / "run", tmp_path / "run")
    want = load_file(str(old / "uninterrupted.safetensors"))
    conf = dict(epochs=2, sampler="flops_bucketed", **OPT)
    b = fresh_net()
    done = train(b, Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert done.finished and done.step == 10
    _assert_recorded_weights(b.state_dict(), want)
    assert _steps(tmp_path / "run") == list(range(1, 11))
    c = fresh_net()
    train(c, Synthetic(40), cfg(tmp_path / "fresh", **conf))
    _assert_recorded_weights(c.state_dict(), want)
    # another setting than the old run's is named, as for any run
    with pytest.raises(CheckpointError, match="schedule.warmup_steps: 2 -> 3"):
        shutil.copytree(old / "run", tmp_path / "again" / "run")
        train(fresh_net(), Synthetic(40), cfg(tmp_path / "again", resume="auto", **{**conf, "warmup_steps": 3}))


def test_an_unreadable_image_stops_training_in_one_line_after_a_checkpoint_or_is_skipped(tmp_path, capsys):
    """Issue 25, item 7: a corrupt JPEG or a truncated PNG in an image folder stops `snnet train` with one line
    naming the file, after a checkpoint of the steps done (resumable); `data.skip_unreadable` leaves such
    images out, says how many, and trains on the rest."""
    data = _image_folder(tmp_path / "imgs")
    corrupt, truncated = _damage(data)
    out = tmp_path / "run"
    # no least-squares calibration (it reads images before the first step): the bad image is met mid-run
    assert _cli(*_train_args(data, out, "--epochs", "1", "--init-images", "0")) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and (str(corrupt) in line or str(truncated) in line), line
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] >= 0  # what was done is kept, and loads
    skipping = tmp_path / "skipping"
    assert _cli(*_train_args(data, skipping, "--epochs", "1", "--data.skip_unreadable", "true")) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images" in err and (skipping / "final" / "model.safetensors").is_file(), err


def test_a_resume_with_changes_can_change_the_sampler(tmp_path):
    """--resume-with-changes --sampler flops_bucketed on a uniform run: accepted by the checks before the network
    is built, then refused when the checkpoint's sampler was loaded ('the checkpoint's stitch sampler (uniform, 12
    stitches) does not match this one'): the new sampler now draws from the saved random stream."""
    from snnet.sampling import make_stitch_sampler

    conf = dict(epochs=2, lr=1e-3, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=3)
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    net = fresh_net()
    r = train(net, Synthetic(40), cfg(tmp_path, resume="auto", resume_with_changes=True,
                                      **{**conf, "sampler": "flops_bucketed"}))
    assert r.finished and len(r.stitches) == r.total_steps - 3
    want = make_stitch_sampler("flops_bucketed", len(net.space), flops=[c.flops for c in net.costs()])
    want.generator.set_state(saved["sampler"][0]["generator"])
    assert list(r.stitches) == [want.sample() for _ in r.stitches]
    segments = json.loads((tmp_path / "run" / "train_config.json").read_text())["segments"]
    assert segments[-1]["changes"] == ['sampling.sampler: "uniform" -> "flops_bucketed"']


def test_resume_auto_without_checkpoint_does_not_start_over_a_run_it_would_destroy(tmp_path):
    """A finished run whose checkpoint.pt was deleted (to free the space), run again with --resume auto: it
    started a fresh run over it, truncating metrics.jsonl, deleting the kept copies of later steps at its first
    checkpoint and writing over final/ at its end; now refused in one line that names a kept copy."""
    conf = dict(epochs=1, lr=1e-3, init_images=0, ckpt_every=2, keep_checkpoints=3)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf))
    run = tmp_path / "run"
    (run / CHECKPOINT_NAME).unlink()
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(snnet.errors.RunFolderError, match="no checkpoint.pt to continue it from: resume from a kept copy "
                       "with --resume .*step-00000005.pt"):
        train(fresh_net(seed=5), Synthetic(40), cfg(tmp_path, resume="auto", **conf), stop_after=2)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume=str(run / "checkpoints" / "step-00000005.pt"), **conf))
    assert r.finished and r.step == 5


@pytest.mark.parametrize("before", ["off", "bf16"])
def test_a_resume_that_turns_fp16_loss_scaling_on_starts_the_scaler_afresh(tmp_path, before):
    """A checkpoint saved without fp16 loss scaling (amp off or bf16; also --amp auto on CPU resumed on a GPU, no
    setting changed) resumed with it: torch's 'The source state dict is empty, possibly because it was saved
    from a disabled instance of GradScaler' traceback; now the run goes on, its scaler as a fresh fp16 run's."""
    conf = dict(epochs=1, lr=1e-3, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, amp=before, **conf), stop_after=2)
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, amp="fp16", resume="auto", resume_with_changes=True, **conf))
    assert r.finished and r.step == 5
    assert load_checkpoint(r.checkpoint)["trainer"]["scaler"]["scale"] > 0


def test_the_launchers_resume_command_keeps_an_option_value_with_a_space(monkeypatch):
    """torchrun's options were joined with spaces and split with shlex: '--log-dir "/tmp/my logs"' came back in the
    printed resume command as --log-dir /tmp/my logs, a command that does not run."""
    import torch.distributed.run as torchrun

    from snnet.commands.config_cli import resume_command
    from snnet.launch import LAUNCHER_ENV, main

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    monkeypatch.setattr(torchrun, "run", lambda args: None)  # the workers are not started
    assert main(["--log-dir", "/tmp/my logs", "--nproc_per_node", "2", "train", "--anchors", TINY]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = shlex.split(resume_command(["--anchors", TINY], "train", False))
    assert command[:6] == ["python", "-m", "snnet.launch", "--log-dir", "/tmp/my logs", "--nproc_per_node"]


def test_the_launcher_finds_the_command_after_an_option_whose_value_is_train(monkeypatch):
    """The command was the first word 'train' or 'demo' anywhere: --rdzv-id train (a job named after what it does)
    split the line there, and torchrun's parser failed with its usage ('--rdzv-id: expected one argument')."""
    import torch.distributed.run as torchrun

    from snnet.launch import LAUNCHER_ENV, main

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    got = []
    monkeypatch.setattr(torchrun, "run", got.append)  # the workers are not started
    assert main(["--rdzv-id", "train", "--nproc_per_node", "2", "train", "--anchors", TINY]) == 0
    assert got[0].rdzv_id == "train" and got[0].nproc_per_node == "2"
    assert got[0].training_script == "snnet" and got[0].training_script_args == ["train", "--anchors", TINY]


class _KilledAfter(Synthetic):
    """Stands in for a kill -9 after ``fetches`` images: the run stops where it is, saving nothing."""

    def __init__(self, n: int, fetches: int) -> None:
        super().__init__(n)
        self.left = fetches

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_a_resume_with_changes_killed_before_its_first_checkpoint_leaves_no_segment(tmp_path):
    """Resumed at step 3 with another rate, killed before its first checkpoint, then resumed with the run's own
    settings: train_config.json kept the killed segment ('optim.lr: 0.001 -> 0.05' from step 3) as the last,
    though steps 4-10 were trained at 0.001, and load_run_config said 0.05."""
    from snnet.train import load_run_config

    conf = dict(epochs=2, lr=1e-3, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh_net(), _KilledAfter(40, 20), cfg(tmp_path, resume="auto", resume_with_changes=True,
                                                     **{**conf, "lr": 5e-2}))
    segments = lambda: json.loads((tmp_path / "run" / "train_config.json").read_text())["segments"]  # noqa: E731
    assert [s["from_step"] for s in segments()] == [0, 3]  # the killed one was written as it started
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert r.finished and [s["from_step"] for s in segments()] == [0]
    assert load_run_config(tmp_path / "run").optim.lr == 1e-3


def test_a_full_disk_under_torchs_own_writer_is_one_line(tmp_path, monkeypatch):
    """torch.save writes through its zip writer, which turns the file's failed write into a RuntimeError of its own
    ('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598'): it escaped save_checkpoint, a
    traceback instead of the CheckpointError line saying the disk is full."""
    import builtins
    import errno

    import snnet.checkpoint as checkpoint_module

    path = tmp_path / CHECKPOINT_NAME
    checkpoint_module.save_checkpoint(path, {"step": 1, "w": torch.zeros(3)})
    before = path.read_bytes()

    class Full:  # a file on a disk that fills up after a few bytes
        def __init__(self, f):
            self.f, self.left = f, 100

        def write(self, b):
            self.left -= len(b)
            if self.left < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint_module, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    with pytest.raises(CheckpointError, match=r"\(No space left on device\); the previous checkpoint is intact; free"):
        checkpoint_module.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before and _temps(tmp_path) == []


def test_a_full_disk_when_the_trained_network_is_saved_is_one_line_and_a_resume_writes_it(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError ('Error while serializing: I/O error: File too
    large (os error 27)' under RLIMIT_FSIZE), not an OSError: a run's last act, writing final/, ended in a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    conf = dict(epochs=1, lr=1e-3, init_images=0)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"cannot write the trained network to .*final \(Error while serializing: "
                       r"I/O error: No space left on device \(os error 28\)\); checkpoint .* holds it: free some disk "
                       r"space and run the same command with --resume auto"):
        train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf))
    monkeypatch.undo()
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf))
    assert r.finished and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_stop_after_a_step_the_run_is_already_at_trains_no_further(tmp_path):
    """stop_after ends the call after that global step: a run resumed at step 5 with stop_after=5 trained step 6."""
    conf = dict(epochs=2, lr=1e-3, init_images=0)
    train(fresh_net(), Synthetic(40), cfg(tmp_path, **conf), stop_after=5)
    r = train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf), stop_after=5)
    assert (r.step, r.stitches, r.finished) == (5, (), False)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 5 and _steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert train(fresh_net(), Synthetic(40), cfg(tmp_path, resume="auto", **conf)).step == 10
