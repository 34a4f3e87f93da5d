"""What each training step sees: which stitch, and which images.

* :class:`StitchSampler` draws a stitch uniformly (the paper's rule); :class:`FlopsBucketSampler`
  first draws a FLOPs bucket, then a stitch in it. Each has its own generator, saved in
  checkpoints, so a resumed run draws the same stitches.
* :class:`EpochSampler` orders the images: a shuffle that is a pure function of (seed, epoch),
  sharded over ranks and resumable mid-epoch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import CheckpointError, SnnetError

__all__ = ["SAMPLERS", "EpochSampler", "FlopsBucketSampler", "StitchSampler", "make_stitch_sampler"]

SAMPLERS = ("uniform", "flops_bucketed")

class StitchSampler:
    """Uniform over the stitch space, with its own generator (so resuming restores it exactly)."""

    kind = "uniform"

    def __init__(self, num_stitches: int, seed: int = 0) -> None:
        if num_stitches < 1:
            raise SnnetError("the stitch space is empty")
        self.num_stitches = num_stitches
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> int:
        return int(torch.randint(self.num_stitches, (1,), generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_stitches": self.num_stitches, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("num_stitches") != self.num_stitches:
            raise CheckpointError(
                f"the checkpoint's stitch sampler ({state.get('kind')}, {state.get('num_stitches')} stitches) does not "
                f"match this one ({self.kind}, {self.num_stitches})")
        self.generator.set_state(state["generator"])


class FlopsBucketSampler(StitchSampler):
    """Pick a FLOPs bucket uniformly, then a stitch in it uniformly.

    The space has many more mid-cost stitches than cheap or dear ones, so uniform sampling
    over stitches trains the middle of the curve most; bucketing by cost gives every part of
    the FLOPs range the same share of steps. Buckets are ``num_buckets`` equal-width FLOPs
    intervals (``quantile=True``: equal-count), empty ones dropped.
    """

    kind = "flops_bucketed"

    def __init__(self, flops: Sequence[int], num_buckets: int = 4, seed: int = 0, quantile: bool = False) -> None:
        super().__init__(len(flops), seed)
        f = np.asarray(flops, dtype=np.float64)
        if quantile:
            edges = np.quantile(f, np.linspace(0, 1, num_buckets + 1))
        else:
            edges = np.linspace(f.min(), f.max(), num_buckets + 1)
        which = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, num_buckets - 1)
        self.buckets: list[list[int]] = [b for b in ([int(i) for i in np.flatnonzero(which == k)] for k in range(num_buckets)) if b]

    def sample(self) -> int:
        bucket = self.buckets[int(torch.randint(len(self.buckets), (1,), generator=self.generator))]
        return bucket[int(torch.randint(len(bucket), (1,), generator=self.generator))]


def make_stitch_sampler(kind: str, num_stitches: int, seed: int = 0, flops: Sequence[int] | None = None,
                        num_buckets: int = 4) -> StitchSampler:
    """The stitch sampler called ``kind`` (one of :data:`SAMPLERS`); ``flops`` (one per stitch)
    is needed by the samplers that group stitches by cost."""
    if kind not in SAMPLERS:
        raise SnnetError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
    if kind == "flops_bucketed":
        if flops is None or len(flops) != num_stitches:
            raise SnnetError("the flops_bucketed sampler needs the FLOPs of every stitch")
        return FlopsBucketSampler(flops, num_buckets, seed)
    return StitchSampler(num_stitches, seed)


# ---------------------------------------------------------------------------- data order


class EpochSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch), sharded over ranks, resumable mid-epoch.

    Like :class:`~torch.utils.data.DistributedSampler` (pad to a multiple of the world size,
    take every ``world``-th index), plus ``start``: the number of leading indices of this
    epoch's shard to skip, so a resumed run continues with exactly the next unseen batch.

    ``repeats > 1`` is repeated augmentation (DeiT's RASampler, timm's RepeatAugSampler): each
    shuffled index is repeated ``repeats`` times in a row before sharding, so consecutive copies
    of an image land on different ranks (each augmented differently), and every rank keeps the
    first ``ceil(size / world)`` indices of its shard, so an epoch still has ``size`` images.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1) -> None:
        if repeats < 1:
            raise SnnetError(f"repeats must be >= 1, got {repeats}")
        self.size, self.seed, self.rank, self.world_size, self.repeats = size, seed, rank, world_size, repeats
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def shard_size(self) -> int:
        return math.ceil(self.size / self.world_size)

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.repeats > 1:
            order = [i for i in order for _ in range(self.repeats)]
        total = math.ceil(len(order) / self.world_size) * self.world_size
        order += order[: total - len(order)]
        return order[self.rank:total:self.world_size][: self.shard_size()]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.shard_size() - self.start
