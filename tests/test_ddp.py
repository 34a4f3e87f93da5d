"""Two CPU processes with gloo: DDP training does not hang, gradients follow the documented rule.

The rule (snnet/train.py): with ``stitch_sync='per_rank'`` and ``ddp_grads='mean'`` (the
default) every parameter gets DDP's mean over all ranks, i.e. the gradient one process computes
on the global batch with each rank's share through its own stitch; a parameter no rank used gets
none. ``ddp_grads='users'`` gives each parameter the mean over the ranks whose route used it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import snnet
from snnet.train import OptimConfig, TrainConfig, Trainer, train

from .conftest import TINY_VITS
from .test_train import Synthetic

TIMEOUT = 120
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
            trainer = Trainer(net, TrainConfig(progress=False, ddp_grads=grads_mode), total_steps=1)
            trainer.backward(*_batch(rank), STITCHES[rank])
            grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}
            torch.save(grads, Path(out) / f"grads_{grads_mode}{rank}.pt")
        for mode in ("per_rank", "shared"):
            net = _net()
            conf = TrainConfig(max_steps=6, batch_size=4, stitch_sync=mode, out_dir=str(Path(out) / mode),
                               progress=False, tensorboard=False, init_images=8, ckpt_every=3)
            result = train(net, Synthetic(48), conf, OptimConfig(lr=1e-3))
            torch.save({"state": net.state_dict(), "stitches": result.stitches}, Path(out) / f"{mode}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """Run the two-process job once (with a timeout, so a DDP hang fails instead of blocking)."""
    out = tmp_path_factory.mktemp("ddp")
    world = 2
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"two-process DDP run hung for {TIMEOUT}s")
    return out


def _single_grads(rank: int) -> dict[str, torch.Tensor | None]:
    net = _net()
    Trainer(net, TrainConfig(progress=False), total_steps=1).backward(*_batch(rank), STITCHES[rank])
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}


@pytest.mark.parametrize("grads_mode", ["mean", "users"])
def test_grads_follow_the_documented_rule(ddp_out, grads_mode):
    g0, g1 = (torch.load(ddp_out / f"grads_{grads_mode}{r}.pt", weights_only=True) for r in range(2))
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
