"""Two CPU processes with gloo: DDP training does not hang, gradients follow the documented rule.

The rule (snnet/train.py): with ``stitch_sync='per_rank'`` and ``ddp_grads='mean'`` (the
default) every parameter gets DDP's mean over all ranks, i.e. the gradient one process computes
on the global batch with each rank's share through its own stitch; a parameter no rank used gets
none. ``ddp_grads='users'`` gives each parameter the mean over the ranks whose route used it —
on every step, not only the first. A run whose rank 1 is killed mid-run and resumed from its
last checkpoint ends with the very weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import snnet
from snnet.config import TrainConfig
from snnet.train import Trainer, train

from .conftest import TINY_VITS, Synthetic, spawn_two

# rank 0 runs the small anchor, rank 1 a stitch into the big one: they share the small
# anchor's stem and first blocks, each also uses parameters the other does not
STITCHES = ("snnet_tiny_vit_ti", "snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[2:]")


def _net() -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(TINY_VITS[:2])


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = Synthetic(8, seed=10 + rank).tensors
    return x, y


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One process group for every check: spawning is the slow part on a small machine."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for grads_mode in ("mean", "users"):
            net = _net()
            trainer = Trainer(net, TrainConfig().override(progress=False, ddp_grads=grads_mode), total_steps=1)
            for k in range(2):  # the second time on the same stitch must give the same gradients
                trainer.backward(*_batch(rank), STITCHES[rank])
                grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}
                torch.save(grads, Path(out) / f"grads_{grads_mode}{rank}{'' if k == 0 else '_again'}.pt")
        for mode in ("per_rank", "shared"):
            net = _net()
            conf = TrainConfig().override(max_steps=6, batch_size=4, stitch_sync=mode, out_dir=str(Path(out) / mode),
                                          progress=False, tensorboard=False, init_images=8, ckpt_every=3)
            result = train(net, Synthetic(48), conf.override(lr=1e-3, lr_base_batch=None))
            torch.save({"state": net.state_dict(), "stitches": result.stitches}, Path(out) / f"{mode}{rank}.pt")
        _sync_changed(rank, Path(out) / "sync")
    finally:
        torch.distributed.destroy_process_group()


SYNC_CHANGES = [("per_rank", "shared"), ("shared", "per_rank")]


def _sync_changed(rank: int, out: Path) -> None:
    """For each (before, after) of SYNC_CHANGES, into ``out/<before>-<after>``: three steps with stitch_sync ``before``,
    then the run resumed with ``after`` (--resume-with-changes)."""
    for before, after in SYNC_CHANGES:
        case = out / f"{before}-{after}"
        conf = TrainConfig().override(max_steps=6, batch_size=4, out_dir=str(case / "run"), progress=False,
                                      tensorboard=False, init_images=0, lr=1e-3, lr_base_batch=None)
        train(_net(), Synthetic(48), conf.override(stitch_sync=before), stop_after=3)
        result = train(_net(), Synthetic(48), conf.override(stitch_sync=after, resume="auto", resume_with_changes=True))
        torch.save(list(result.stitches), case / f"stitches{rank}.pt")


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """Run the two-process job once."""
    out = tmp_path_factory.mktemp("ddp")
    spawn_two(_worker, str(out))
    return out


class _DiesAt(Synthetic):
    """Rank 1 kills itself with SIGKILL (no clean-up of any kind) while fetching the batch of step ``step``."""

    def __init__(self, n: int, step: int, batch_size: int) -> None:
        super().__init__(n)
        self.fetches_before_death = (step - 1) * batch_size
        self.fetched = 0

    def __getitem__(self, i):
        if torch.distributed.get_rank() == 1:
            self.fetched += 1
            if self.fetched > self.fetches_before_death:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def _killed_or_resumed(rank: int, world: int, port: int, out: str, resume: bool) -> None:
    """The per_rank run of _worker, into ``out/per_rank``: rank 1 killed at step 5 (its last checkpoint:
    step 3), or that run resumed."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _net()
        conf = TrainConfig().override(max_steps=6, batch_size=4, out_dir=str(Path(out) / "per_rank"), progress=False,
                                      tensorboard=False, init_images=8, ckpt_every=3, resume="auto" if resume else None)
        data = Synthetic(48) if resume else _DiesAt(48, step=5, batch_size=4)
        result = train(net, data, conf.override(lr=1e-3, lr_base_batch=None))
        torch.save({"state": net.state_dict(), "stitches": result.stitches}, Path(out) / f"resumed{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_resumed(tmp_path_factory) -> Path:
    """The two-process per_rank run, rank 1 killed with SIGKILL at step 5, then resumed from step 3."""
    out = tmp_path_factory.mktemp("ddp_kill")
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL|signal"):
        spawn_two(_killed_or_resumed, str(out), False)
    spawn_two(_killed_or_resumed, str(out), True)
    return out


def _single_grads(rank: int) -> dict[str, torch.Tensor | None]:
    net = _net()
    Trainer(net, TrainConfig().override(progress=False), total_steps=1).backward(*_batch(rank), STITCHES[rank])
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}


@pytest.mark.parametrize("again", ["", "_again"])
@pytest.mark.parametrize("grads_mode", ["mean", "users"])
def test_grads_follow_the_documented_rule(ddp_out, grads_mode, again):
    g0, g1 = (torch.load(ddp_out / f"grads_{grads_mode}{r}{again}.pt", weights_only=True) for r in range(2))
    ref = [_single_grads(0), _single_grads(1)]
    kinds = set()
    for name in g0:
        a, b = ref[0][name], ref[1][name]
        if a is not None and b is not None:
            want, kind = (a + b) / 2, "both"
        elif a is not None or b is not None:
            one = a if a is not None else b
            # 'mean': the global batch's gradient (the other rank contributed zero); 'users': that rank's own
            want, kind = (one / 2 if grads_mode == "mean" else one), "one"
        else:
            want, kind = None, "none"
        kinds.add(kind)
        for got in (g0[name], g1[name]):  # both ranks hold the same gradient
            if want is None:
                assert got is None, name
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert kinds == {"both", "one", "none"}  # every case of the rule was exercised


@pytest.mark.parametrize("mode", ["per_rank", "shared"])
def test_two_process_training_ends_with_identical_weights(ddp_out, mode):
    r0, r1 = (torch.load(ddp_out / f"{mode}{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert len(r0["stitches"]) == 6
    if mode == "shared":
        assert r0["stitches"] == r1["stitches"]
    else:
        assert r0["stitches"] != r1["stitches"]  # each rank draws its own stitches
    run = ddp_out / mode
    assert (run / "final" / "model.safetensors").is_file()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["sampler"]) == 2 and ckpt["step"] == 6
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_uninterrupted_weights(ddp_out, ddp_resumed):
    """Rank 1 killed at step 5 and the job resumed from step 3: to the bit the weights of _worker's uninterrupted run."""
    ckpt = torch.load(ddp_resumed / "per_rank" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2
    for rank in range(2):
        full = torch.load(ddp_out / f"per_rank{rank}.pt", weights_only=True)
        resumed = torch.load(ddp_resumed / f"resumed{rank}.pt", weights_only=True)
        assert resumed["stitches"] == full["stitches"][3:]  # steps 4-6, drawn again from the checkpoint's sampler
        assert all(torch.equal(full["state"][k], resumed["state"][k]) for k in full["state"])
    steps = [int(ln.split('"step": ')[1].split(",")[0]) for ln in
             (ddp_resumed / "per_rank" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the killed run's step 4 was dropped and redone


class _SlowToRead(Synthetic):
    def __getitem__(self, i):
        time.sleep(0.5)
        return super().__getitem__(i)


def _validates(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 evaluates every stitch at the epoch's end for longer than the process group's timeout (4 s against 2 s:
    a stand-in for ImageNet's validation split against gloo's 30 minutes, NCCL's 10)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=2))
    try:
        conf = TrainConfig().override(epochs=1, batch_size=4, out_dir=str(Path(out) / "run"), progress=False,
                                      tensorboard=False, init_images=0, lr=1e-3, lr_base_batch=None)
        result = train(_net(), Synthetic(16), conf, val_data=_SlowToRead(8))
        torch.save({"finished": result.finished, "evals": len(result.evals)}, Path(out) / f"validated{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_the_other_ranks_wait_for_rank_0s_evaluation_however_long(tmp_path):
    """They waited in the next step's collective, which timed out ('Timed out waiting 2000ms'): a run validating each
    epoch on a real validation split crashed at the end of its first epoch."""
    spawn_two(_validates, str(tmp_path))
    got = [torch.load(tmp_path / f"validated{rank}.pt", weights_only=True) for rank in range(2)]
    assert got == [{"finished": True, "evals": 1}, {"finished": True, "evals": 0}]
    assert len((tmp_path / "run" / "evals.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("before,after", SYNC_CHANGES)
def test_a_resume_that_changes_stitch_sync_samples_as_the_new_setting_says(ddp_out, before, after):
    """Each rank took its saved sampler back whatever stitch_sync now said: per_rank -> shared went on drawing
    a stitch per rank (and _sync_grads, taking them for one, left DDP's mean over two routes); shared ->
    per_rank went on drawing one stitch for both."""
    case = ddp_out / "sync" / f"{before}-{after}"
    s0, s1 = (torch.load(case / f"stitches{rank}.pt", weights_only=True) for rank in range(2))
    assert len(s0) == len(s1) == 3
    if after == "shared":
        assert s0 == s1
    else:
        assert s0 != s1
