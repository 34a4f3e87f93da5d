"""What snnet's DDP gradient rule changes: 'mean' (DDP's own) vs 'users' (rescaled), AdamW and SGD.

With every process training its own stitch, DDP averages each gradient over all N processes,
so a parameter used by k of them gets k/N of the mean of its users' gradients.
``ddp_grads='users'`` multiplies it back by N/k. This runs the same training (tiny ViT family,
the same batches and the same stitches on each of 2 gloo processes) both ways, with AdamW and
with SGD (momentum 0.9), next to two single-process references:

* **global batch**: one process takes, each step, both processes' batches, each through its own
  stitch, and averages the loss (the single-process run of the same global batch);
* **sequential**: one process takes the two batches one after the other at half the rate (the
  linear scaling rule's equivalent of one 2-process step).

It prints the change of the stitching layers and of the anchors over the first step and over
the run (ratios to the global-batch reference), how far each run ends from each reference
(relative to how far the reference moved), and the mean loss of every network of the space on
held-out images.

    .venv/bin/python benchmarks/bench_ddp_grads.py            # 40 steps, batch 16 per process
    .venv/bin/python benchmarks/bench_ddp_grads.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

import snnet
from snnet.config import TrainConfig
from snnet.train import Trainer

ANCHORS = ["snnet_tiny_vit_ti", "snnet_tiny_vit_s"]
WORLD = 2
# per-process learning rates of the 2-process runs; the single-process reference uses half
LR = {"adamw": 2e-3, "sgd": 0.1}
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 2e-5}
MODES = ("mean", "users")


class Scripted:
    """A stitch 'sampler' that replays a fixed list (so every run trains the same stitches)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = list(ids)

    def sample(self) -> int:
        return self.ids.pop(0)


def task(steps: int, batch: int, seed: int = 0):
    """A learnable task (class templates plus noise), each process's batches, and the stitches."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(10, (n,), generator=g)
        return templates[y] + 0.7 * torch.randn(n, 3, 32, 32, generator=g), y

    batches = [[draw(batch) for _ in range(steps)] for _ in range(WORLD)]
    held_out = draw(256)
    torch.manual_seed(seed)
    n = len(snnet.create_snnet(ANCHORS, device="meta").space)
    stitches = torch.randint(n, (WORLD, steps), generator=g).tolist()
    return batches, held_out, stitches


def fresh_net() -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(ANCHORS)


def configs(opt: str, lr: float, mode: str = "mean", steps: int = 1) -> TrainConfig:
    # (min_lr = lr: a constant rate, since the comparison is about gradients, not the schedule; lr as given)
    return TrainConfig().override(progress=False, tensorboard=False, label_smoothing=0.0, ddp_grads=mode, lr=lr,
                                  lr_base_batch=None, optimizer=opt, weight_decay=WEIGHT_DECAY[opt], clip_grad=None,
                                  min_lr=lr)


def snapshot(net: snnet.StitchedNet) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def run(net: snnet.StitchedNet, trainer: Trainer, batches, stitches: list[int]) -> list[dict[str, torch.Tensor]]:
    """Train on ``batches`` with ``stitches``; parameters after every step."""
    trainer.sampler = Scripted(stitches)
    out = []
    for x, y in batches:
        trainer.step(x, y)
        out.append(snapshot(net))
    return out


def _worker(rank: int, port: int, steps: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        batches, _, stitches = task(steps, batch)
        results = {}
        for opt in LR:
            for mode in MODES:
                net = fresh_net()
                trainer = Trainer(net, configs(opt, LR[opt], mode), total_steps=steps)
                trail = run(net, trainer, batches[rank], stitches[rank])
                results[(opt, mode)] = (trail[0], trail[-1])
        if rank == 0:
            torch.save(results, Path(out) / "ddp.pt")
    finally:
        torch.distributed.destroy_process_group()


def sequential(opt: str, steps: int, batch: int) -> tuple[dict, dict]:
    """One process, the two processes' batches and stitches one after the other, at half the rate."""
    batches, _, stitches = task(steps, batch)
    net = fresh_net()
    trainer = Trainer(net, configs(opt, LR[opt] / WORLD), total_steps=steps * WORLD)
    order = [(batches[r][t], stitches[r][t]) for t in range(steps) for r in range(WORLD)]
    trail = run(net, trainer, [b for b, _ in order], [s for _, s in order])
    return trail[WORLD - 1], trail[-1]


def global_batch(opt: str, steps: int, batch: int) -> tuple[dict, dict, snnet.StitchedNet]:
    """One process, each step both processes' batches through their own stitches, losses averaged."""
    batches, _, stitches = task(steps, batch)
    net = fresh_net()
    trainer = Trainer(net, configs(opt, LR[opt]), total_steps=steps)
    trail = []
    for t in range(steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        for r in range(WORLD):
            x, y = batches[r][t]
            net.select(stitches[r][t])
            (trainer.loss(net(x), x, y) / WORLD).backward()
        trainer.optimizer.step()
        trail.append(snapshot(net))
    return trail[0], trail[-1], net


@torch.no_grad()
def mean_loss(net: snnet.StitchedNet, params: dict[str, torch.Tensor], held_out) -> float:
    for k, p in net.named_parameters():
        p.copy_(params[k])
    net.eval()
    x, y = held_out
    losses = []
    for s in net.space:
        net.select(s)
        losses.append(torch.nn.functional.cross_entropy(net(x), y).item())
    return sum(losses) / len(losses)


def norm(delta: dict[str, torch.Tensor], stitching: bool) -> float:
    keys = [k for k in delta if k.startswith("stitch_layers.") == stitching]
    return float(torch.sqrt(sum((delta[k] ** 2).sum() for k in keys)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(port, args.steps, args.batch_size, out), nprocs=WORLD, start_method="spawn")
        ddp = torch.load(Path(out) / "ddp.pt", weights_only=True)

    _, held_out, _ = task(args.steps, args.batch_size)
    start = snapshot(fresh_net())
    print(f"{WORLD} gloo processes, {args.steps} steps of batch {args.batch_size} each, tiny ViT family "
          f"({', '.join(ANCHORS)}); references: 1 process with the global batch, and 1 process taking "
          f"{WORLD * args.steps} steps at half the rate\n")
    cols = ("global batch", "sequential", "mean", "users")
    header = f"{'optimizer':<9} {'what':<40}" + "".join(f"{c:>13}" for c in cols) + f"{'mean/glob':>10}{'users/glob':>11}"
    print(header)
    print("-" * len(header))

    def delta(a: dict, b: dict, stitching: bool | None = None) -> float:
        if stitching is None:
            return (delta(a, b, True) ** 2 + delta(a, b, False) ** 2) ** 0.5
        return norm({k: a[k] - b[k] for k in start}, stitching)

    for opt in LR:
        first_seq, last_seq = sequential(opt, args.steps, args.batch_size)
        first_glob, last_glob, net = global_batch(opt, args.steps, args.batch_size)
        first = {"global batch": first_glob, "sequential": first_seq, **{m: ddp[(opt, m)][0] for m in MODES}}
        last = {"global batch": last_glob, "sequential": last_seq, **{m: ddp[(opt, m)][1] for m in MODES}}
        for label, ends in (("first step", first), ("whole run", last)):
            for stitching, group in ((True, "stitching layers"), (False, "anchors")):
                v = [delta(ends[c], start, stitching) for c in cols]
                print(f"{opt:<9} {label + ': |change| of ' + group:<40}" + "".join(f"{x:>13.4f}" for x in v)
                      + f"{v[2] / v[0]:>10.3f}{v[3] / v[0]:>11.3f}")
        for ref in ("global batch", "sequential"):
            moved = delta(last[ref], start)
            v = [delta(last[c], last[ref]) / moved for c in cols]
            print(f"{opt:<9} {'end: distance to ' + ref + ' (relative)':<40}" + "".join(f"{x:>13.4f}" for x in v))
        losses = [mean_loss(net, last[c], held_out) for c in cols]
        print(f"{opt:<9} {'end: held-out loss (start ' + format(mean_loss(net, start, held_out), '.3f') + ')':<40}"
              + "".join(f"{x:>13.4f}" for x in losses) + "\n")


if __name__ == "__main__":
    main()
