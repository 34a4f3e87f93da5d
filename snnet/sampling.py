"""What each training step sees: which stitch, and which images.

* :class:`StitchSampler` draws a stitch uniformly (the paper's rule); :class:`FlopsBucketSampler`
  first draws a FLOPs bucket, then a stitch in it; :class:`ResourceSampler` is SN-Netv2's
  resource-constrained sampling (ROS), which groups stitches by a FLOPs gap instead of a fixed
  number of buckets. Each has its own generator, saved in checkpoints, so a resumed run draws
  the same stitches.
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

__all__ = ["ROS_GAP", "SAMPLERS", "EpochSampler", "FlopsBucketSampler", "GroupedSampler", "ResourceSampler", "StitchSampler",
           "make_stitch_sampler", "ros_groups"]

SAMPLERS = ("uniform", "flops_bucketed", "ros")
# ROS's default gap between FLOPs groups, as a share of the space's FLOPs range: the authors'
# 1 GFLOP on DeiT3-S/L's 4.6-61.6 GFLOPs, which groups that space as theirs does (13 groups).
ROS_GAP = 0.0175

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


class GroupedSampler(StitchSampler):
    """Draw a group of stitches (uniformly, or with ``probs``), then a stitch in it uniformly."""

    kind = "grouped"

    def __init__(self, num_stitches: int, groups: Sequence[Sequence[int]], probs: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        super().__init__(num_stitches, seed)
        self.groups: list[list[int]] = [list(g) for g in groups if len(g)]
        if sorted(i for g in self.groups for i in g) != list(range(num_stitches)):
            raise SnnetError("the sampler's groups must hold every stitch exactly once")
        self.probs = None if probs is None else torch.tensor(probs, dtype=torch.float64)
        if self.probs is not None and (len(self.probs) != len(self.groups) or not (self.probs >= 0).all()
                                       or float(self.probs.sum()) <= 0):
            raise SnnetError(f"need one non-negative weight per group ({len(self.groups)}), not all zero")

    @property
    def buckets(self) -> list[list[int]]:  # the name FlopsBucketSampler has always used
        return self.groups

    def sample(self) -> int:
        if self.probs is None:
            group = self.groups[int(torch.randint(len(self.groups), (1,), generator=self.generator))]
        else:
            group = self.groups[int(torch.multinomial(self.probs, 1, generator=self.generator))]
        return group[int(torch.randint(len(group), (1,), generator=self.generator))]

    def state_dict(self) -> dict[str, Any]:
        return dict(super().state_dict(), groups=self.groups)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "groups" in state and [list(g) for g in state["groups"]] != self.groups:
            raise CheckpointError(f"the checkpoint's {self.kind} sampler grouped the stitches differently "
                                  f"({len(state['groups'])} groups, now {len(self.groups)}): resume with the same options")
        super().load_state_dict(state)


class FlopsBucketSampler(GroupedSampler):
    """Pick a FLOPs bucket uniformly, then a stitch in it uniformly.

    The space has many more mid-cost stitches than cheap or dear ones, so uniform sampling
    over stitches trains the middle of the curve most; bucketing by cost gives every part of
    the FLOPs range the same share of steps. Buckets are ``num_buckets`` equal-width FLOPs
    intervals (``quantile=True``: equal-count), empty ones dropped.
    """

    kind = "flops_bucketed"

    def __init__(self, flops: Sequence[int], num_buckets: int = 4, seed: int = 0, quantile: bool = False) -> None:
        f = np.asarray(flops, dtype=np.float64)
        if quantile:
            edges = np.quantile(f, np.linspace(0, 1, num_buckets + 1))
        else:
            edges = np.linspace(f.min(), f.max(), num_buckets + 1)
        which = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, num_buckets - 1)
        super().__init__(len(flops), [[int(i) for i in np.flatnonzero(which == k)] for k in range(num_buckets)], None, seed)


def ros_groups(flops: Sequence[float], gap: float) -> list[list[int]]:
    """SN-Netv2's FLOPs groups: in order of cost, a group opens at the cheapest stitch not yet
    grouped and takes every following stitch within ``gap`` FLOPs of it (more than ``gap``
    opens the next). Stitch ids in each group are sorted."""
    groups: list[list[int]] = []
    first = 0.0
    for i in sorted(range(len(flops)), key=lambda k: (flops[k], k)):
        if groups and flops[i] - first <= gap:
            groups[-1].append(i)
        else:
            groups.append([i])
            first = flops[i]
    return [sorted(g) for g in groups]


class ResourceSampler(GroupedSampler):
    """SN-Netv2's resource-constrained sampling (ROS): a FLOPs group, then a stitch in it.

    Groups come from :func:`ros_groups` with an absolute ``gap`` (the authors use 1 GFLOP on
    DeiT3; :func:`make_stitch_sampler` takes it as a share of the space's FLOPs range). A group
    is drawn uniformly, or, with ``ramp=k``, with weight ``i / k + 1 / G`` for the ``i``-th
    cheapest of ``G`` groups (the authors' ``flops_sampling_k``: dearer groups drawn more often).

    How it differs from :class:`FlopsBucketSampler`: that one cuts the range into a fixed
    number of equal-width buckets; ROS opens a group wherever a stitch is more than ``gap``
    dearer than the current group's first, so the number of groups follows the spread of
    costs (dense stretches get one group per ``gap``, a lone stitch its own group) and no
    bucket edge falls between two stitches that cost almost the same. The authors' code starts
    the first group at 0 FLOPs instead of at the cheapest stitch: the same unless the cheapest
    stitch costs less than the gap.
    """

    kind = "ros"

    def __init__(self, flops: Sequence[float], gap: float, ramp: float | None = None, seed: int = 0) -> None:
        if gap < 0:
            raise SnnetError(f"the ROS FLOPs gap must be >= 0, got {gap}")
        if ramp is not None and ramp <= 0:
            raise SnnetError(f"the ROS ramp k must be > 0, got {ramp}")
        groups = ros_groups(flops, gap)
        probs = None if ramp is None else [i / ramp + 1 / len(groups) for i in range(len(groups))]
        super().__init__(len(flops), groups, probs, seed)
        self.gap, self.ramp = gap, ramp


def make_stitch_sampler(kind: str, num_stitches: int, seed: int = 0, flops: Sequence[int] | None = None,
                        num_buckets: int = 4, ros_gap: float = ROS_GAP, ros_ramp: float | None = None) -> StitchSampler:
    """The stitch sampler called ``kind`` (one of :data:`SAMPLERS`); ``flops`` (one per stitch)
    is needed by the samplers that group stitches by cost. ``ros_gap`` is ROS's gap as a share
    of the space's FLOPs range (see :data:`ROS_GAP`)."""
    if kind not in SAMPLERS:
        raise SnnetError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
    if kind in ("flops_bucketed", "ros"):
        if flops is None or len(flops) != num_stitches:
            raise SnnetError(f"the {kind} sampler needs the FLOPs of every stitch")
        if kind == "ros":
            return ResourceSampler(flops, ros_gap * (max(flops) - min(flops)), ros_ramp, seed)
        return FlopsBucketSampler(flops, num_buckets, seed)
    return StitchSampler(num_stitches, seed)


# ---------------------------------------------------------------------------- data order


class EpochSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch), sharded over ranks, resumable mid-epoch.

    Like :class:`~torch.utils.data.DistributedSampler` (pad to a multiple of the world size,
    take every ``world``-th index), plus ``start``: the number of leading indices of this
    epoch's shard to skip, so a resumed run continues with exactly the next unseen batch.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
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
        total = self.shard_size() * self.world_size
        order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.shard_size() - self.start
