"""What each training step sees: which stitch, and which images.

* :class:`StitchSampler` draws a stitch uniformly (the paper's rule); :class:`FlopsBucketSampler`
  first draws a FLOPs bucket, then a stitch in it; :class:`ResourceSampler` is SN-Netv2's
  resource-constrained sampling (ROS), which groups stitches by a FLOPs gap instead of a fixed
  number of buckets; :class:`WeightedSampler` draws named stitches more often than the rest.
  Each has its own generator, saved in checkpoints, so a resumed run draws the same stitches.
* :class:`EpochSampler` orders the images: a shuffle that is a pure function of (seed, epoch),
  sharded over ranks and resumable mid-epoch.
* :class:`SeededItems` makes each image's random augmentation a pure function of (seed, epoch,
  index): the same in every run, with any number of loader workers, and after a resume.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from .config import ROS_GAP, SAMPLERS
from .errors import CheckpointError, SnnetError

__all__ = ["ROS_GAP", "SAMPLERS", "EpochSampler", "FlopsBucketSampler", "GroupedSampler", "ResourceSampler",
           "SeededItems", "StitchSampler", "WeightedSampler", "make_stitch_sampler", "mix_seed", "ros_groups", "seed_everything", "seed_worker",
           "WorkerLoader", "held_signals"]

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


class WeightedSampler(StitchSampler):
    """Each stitch drawn with probability proportional to its weight (all 1: :class:`StitchSampler`'s draw).

    For a space where some stitches need more steps than a uniform share gives them (the demo's
    large->small routes, the top of its FLOPs range): name them in ``sampling.weighted_stitches``.
    """

    kind = "weighted"

    def __init__(self, weights: Sequence[float], seed: int = 0) -> None:
        super().__init__(len(weights), seed)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        if not (torch.isfinite(self.weights).all() and (self.weights >= 0).all() and float(self.weights.sum()) > 0):
            raise SnnetError(f"need one finite non-negative weight per stitch ({len(weights)}), not all zero")

    def sample(self) -> int:
        return int(torch.multinomial(self.weights, 1, generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return dict(super().state_dict(), weights=self.weights.tolist())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state and list(state["weights"]) != self.weights.tolist():
            raise CheckpointError(f"the checkpoint's weighted sampler weighted the stitches differently: resume with "
                                  f"the same sampling.weighted_stitches and stitch_weight")
        super().load_state_dict(state)


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
        probs = None if self.probs is None else self.probs.tolist()
        return dict(super().state_dict(), groups=self.groups, probs=probs)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "groups" in state and [list(g) for g in state["groups"]] != self.groups:
            raise CheckpointError(f"the checkpoint's {self.kind} sampler grouped the stitches differently "
                                  f"({len(state['groups'])} groups, now {len(self.groups)}): resume with the same options")
        # the groups' weights (ROS's ramp) decide the draws as much as the groups; older checkpoints do not record them
        if "probs" in state and state["probs"] != (None if self.probs is None else self.probs.tolist()):
            raise CheckpointError(f"the checkpoint's {self.kind} sampler weighted its groups differently "
                                  "(sampling.ros_ramp): resume with the same options")
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
                        num_buckets: int = 4, ros_gap: float = ROS_GAP, ros_ramp: float | None = None,
                        weights: Sequence[float] | None = None) -> StitchSampler:
    """The stitch sampler called ``kind`` (one of :data:`SAMPLERS`); ``flops`` (one per stitch)
    is needed by the samplers that group stitches by cost, ``weights`` (one per stitch) by the
    weighted one. ``ros_gap`` is ROS's gap as a share of the space's FLOPs range (see :data:`ROS_GAP`)."""
    if kind not in SAMPLERS:
        raise SnnetError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
    if kind == "weighted":
        if weights is None or len(weights) != num_stitches:
            raise SnnetError("the weighted sampler needs a weight for every stitch")
        return WeightedSampler(weights, seed)
    if kind in ("flops_bucketed", "ros"):
        if flops is None or len(flops) != num_stitches:
            raise SnnetError(f"the {kind} sampler needs the FLOPs of every stitch")
        if kind == "ros":
            return ResourceSampler(flops, ros_gap * (max(flops) - min(flops)), ros_ramp, seed)
        return FlopsBucketSampler(flops, num_buckets, seed)
    return StitchSampler(num_stitches, seed)


# ---------------------------------------------------------------------------- data order


class EpochSampler(Sampler[Any]):
    """A shuffle that is a pure function of (seed, epoch), sharded over ranks, resumable mid-epoch.

    Like :class:`~torch.utils.data.DistributedSampler` (pad to a multiple of the world size,
    take every ``world``-th index), plus ``start``: the number of leading indices of this
    epoch's shard to skip, so a resumed run continues with exactly the next unseen batch.

    ``repeats > 1`` is repeated augmentation (DeiT's RASampler, timm's RepeatAugSampler): each
    shuffled index is repeated ``repeats`` times in a row before sharding, so consecutive copies
    of an image land on different ranks (each augmented differently), and every rank keeps the
    first ``ceil(size / world)`` indices of its shard, so an epoch still has ``size`` images.
    ``distinct_copies=True`` (for a dataset that says ``distinct_copies = True``: :class:`SeededItems`,
    Fashion-MNIST) yields the ``c``-th copy of image ``i`` as the pair ``(i, c)``, which such a dataset
    reads with an augmentation draw of its own; the plain index (one draw per image and epoch) would
    make the copies identical. A pair, not an index past the dataset's end: those stay an IndexError,
    which is what ends iterating a dataset directly.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1,
                 distinct_copies: bool = False) -> None:
        if repeats < 1:
            raise SnnetError(f"repeats must be >= 1, got {repeats}")
        self.size, self.seed, self.rank, self.world_size, self.repeats = size, seed, rank, world_size, repeats
        self.distinct_copies = distinct_copies
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def shard_size(self) -> int:
        return math.ceil(self.size / self.world_size)

    def _indices(self) -> list[Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order: list[Any] = torch.randperm(self.size, generator=g).tolist()
        if self.repeats > 1:
            order = [(i, c) if self.distinct_copies else i for i in order for c in range(self.repeats)]
        total = math.ceil(len(order) / self.world_size) * self.world_size
        order += order[: total - len(order)]
        return order[self.rank:total:self.world_size][: self.shard_size()]

    def __iter__(self) -> Iterator[Any]:  # an index, or (index, copy) with distinct_copies
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.shard_size() - self.start


# ---------------------------------------------------------------------------- augmentation draws


def mix_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from a few integers (splitmix64 over each), so that nearby
    (seed, epoch, index) tuples give unrelated random streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        p = int(p)  # a numpy or torch integer (a sampler's index) would overflow or wrap in its own 64 bits
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x >> 1


def seed_everything(seed: int, *, cuda: bool = True) -> None:
    """Seed torch, numpy and Python's ``random``: everything a run draws from outside its own
    generators (random-init weights, dropout, augmentation). ``cuda=False`` leaves CUDA's generators
    alone (data loading never draws there, and :func:`_isolated_rng` restores the CPU ones only)."""
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy and ``random`` for a block, then put their states back,
    so the draws inside depend on ``seed`` alone and nothing outside sees them."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    seed_everything(seed, cuda=False)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededItems(Subset):
    """A dataset whose item ``i`` is drawn with every global generator seeded from (seed, epoch, i).

    Transforms that draw from torch, numpy or ``random`` (timm's random crops, flips,
    RandAugment) then give an image the same augmentation in every run with the same seed,
    whichever loader worker fetches it and however many there are, and a run resumed
    mid-epoch sees exactly the images an uninterrupted one would. The global generators
    are restored after each item, so loading data never moves the training's own RNG.

    A :class:`~torch.utils.data.Subset` of every index, so ``snnet.data.set_epoch`` reaches
    the dataset inside (and its own per-epoch draws). Use :meth:`wrap`, which leaves alone
    datasets that say (``deterministic_items = True``) that their items draw nothing.

    Item ``(i, c)`` is the ``c``-th copy of image ``i`` under repeated augmentation
    (:class:`EpochSampler`'s ``distinct_copies``), drawn with a seed of its own.
    """

    # item (i, c): copy c of image i, augmented on its own (EpochSampler's distinct_copies)
    distinct_copies = True

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__(dataset, range(len(dataset)))  # type: ignore[arg-type]
        self.seed, self.epoch = seed, 0

    @classmethod
    def wrap(cls, dataset: Dataset, seed: int) -> Dataset:
        """``dataset`` itself if its items draw no random numbers, else it wrapped."""
        return dataset if getattr(dataset, "deterministic_items", False) else cls(dataset, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        index, copy = index if isinstance(index, tuple) else (index, 0)
        index = self.indices[index]  # past the end: IndexError, which ends iterating the dataset directly
        # copy c seeded as the index i + c * len, so the draws are those of the runs that numbered copies so
        seed = mix_seed(self.seed, self.epoch, index + copy * len(self.indices))
        if get_worker_info() is not None:  # a loader worker: its generators serve nothing else, no need to restore
            seed_everything(seed, cuda=False)
            return self.dataset[index]
        with _isolated_rng(seed):  # the main process: training draws from the same generators
            return self.dataset[index]

    def __getitems__(self, indices: list[Any]) -> list[Any]:  # Subset's batched fetch would skip the seeding
        return [self[i] for i in indices]


def seed_worker(seed: int, epoch: int) -> Any:
    """A DataLoader ``worker_init_fn``: each worker's generators seeded from (seed, epoch, worker)
    (give it to a :class:`WorkerLoader`, which leaves Ctrl-C and SIGTERM to the main process)."""
    return functools.partial(_init_worker, seed, epoch)  # a partial, not a closure: spawned workers pickle it


def _init_worker(seed: int, epoch: int, worker_id: int) -> None:
    seed_everything(mix_seed(seed, epoch, worker_id), cuda=False)


# Ctrl-C and SIGTERM are the main process's: it stops at a step boundary and checkpoints. A SIGTERM sent
# to the whole process group (systemd, Slurm, `timeout`, `kill -- -PGID`) also reached the workers, and a
# worker killed by it made torch raise "DataLoader worker killed" anywhere in the main process (inside a
# backward pass too) before the run could checkpoint. Ignoring SIGTERM in the worker left two holes: the
# signal could land between the worker's start and its init function (torch's own handler kills a worker
# that a process other than its parent signals), and a worker that ignores SIGTERM survives the terminate()
# of the interpreter's exit, which then waits for it for ever (an exception that escapes with the loader
# alive hung the run). So the main process holds the two signals while it starts workers (a fork keeps
# them pending in the worker), and each worker drops them, leaves the process group, and takes torch's
# handler back (its parent's SIGTERM, on shutdown, ends it).
_HELD = (signal.SIGINT, signal.SIGTERM)
_CAN_HOLD = hasattr(signal, "pthread_sigmask") and hasattr(os, "setpgid")


def _detached_worker(init: Any, worker_id: int) -> None:
    if _CAN_HOLD:
        for s in _HELD:  # ignoring a signal discards it if pending: one sent to the group while held
            signal.signal(s, signal.SIG_IGN)
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
        torch._C._set_worker_signal_handlers()  # SIGTERM from the parent ends the worker; from anyone else, ignored now (another group)
    if init is not None:
        init(worker_id)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM held pending in this thread (and in processes forked meanwhile) until the block ends."""
    if not _CAN_HOLD:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class WorkerLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose workers leave Ctrl-C and SIGTERM to the main process,
    even when the signal is sent to the whole process group (the note above ``_HELD``)."""

    def __init__(self, *args: Any, worker_init_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=functools.partial(_detached_worker, worker_init_fn), **kwargs)

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        with held_signals():
            return super()._get_iterator()
