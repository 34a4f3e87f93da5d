"""snnet.sampling: the stitch each training step draws (SN-Netv2's ROS, the weighted draw)."""

from __future__ import annotations

from collections import Counter

import pytest

import snnet
from snnet.config import TrainConfig
from snnet.errors import ConfigError
from snnet.sampling import make_stitch_sampler, ResourceSampler, WeightedSampler, ros_groups
from snnet.train import Trainer

from .conftest import TINY_VITS, seeded_net


def test_ros_groups_follow_the_gap() -> None:
    flops = [10, 0, 2, 11, 30, 1, 3]
    # from the cheapest: 0,1,2 within 2 of 0; 3 opens; 10,11; 30
    assert ros_groups(flops, 2) == [[1, 2, 5], [6], [0, 3], [4]]
    assert ros_groups(flops, 0) == [[1], [5], [2], [6], [0], [3], [4]]
    assert ros_groups(flops, 100) == [list(range(7))]


def test_ros_sampler_frequencies_and_resume() -> None:
    flops = [0, 1, 2, 10, 11, 30]  # groups {0,1,2}, {3,4}, {5}
    s = ResourceSampler(flops, gap=2, seed=0)
    n = 30000
    picks = Counter(s.sample() for _ in range(n))
    want = {0: 1 / 9, 1: 1 / 9, 2: 1 / 9, 3: 1 / 6, 4: 1 / 6, 5: 1 / 3}
    assert all(abs(picks[k] / n - p) < 0.012 for k, p in want.items()), picks
    ramp = ResourceSampler(flops, gap=2, ramp=1.0, seed=0)  # weights 0+1/3, 1+1/3, 2+1/3
    picks = Counter(ramp.sample() for _ in range(n))
    share = [sum(picks[i] for i in g) / n for g in ramp.groups]
    assert all(abs(a - b) < 0.012 for a, b in zip(share, [1 / 12, 4 / 12, 7 / 12])), share
    state = s.state_dict()
    ahead = [s.sample() for _ in range(50)]
    again = ResourceSampler(flops, gap=2, seed=5)
    again.load_state_dict(state)
    assert [again.sample() for _ in range(50)] == ahead
    with pytest.raises(snnet.CheckpointError, match="grouped"):
        ResourceSampler(flops, gap=20, seed=0).load_state_dict(state)
    # the same groups drawn with other weights (another ros_ramp) are not the run that was saved
    with pytest.raises(snnet.CheckpointError, match="weighted its groups differently"):
        ResourceSampler(flops, gap=2, ramp=1.0, seed=0).load_state_dict(state)
    with pytest.raises(snnet.CheckpointError, match="weighted its groups differently"):
        ResourceSampler(flops, gap=2, seed=0).load_state_dict(ramp.state_dict())
    resumed = ResourceSampler(flops, gap=2, ramp=1.0, seed=3)
    resumed.load_state_dict(ramp.state_dict())  # the same ramp resumes
    # from the training config: the gap is a share of the FLOPs range
    assert make_stitch_sampler("ros", 6, 0, flops, ros_gap=2 / 30).groups == s.groups


def test_weighted_sampler_draws_in_proportion_and_resumes() -> None:
    s = make_stitch_sampler("weighted", 4, 0, weights=[1, 1, 2, 0])
    assert isinstance(s, WeightedSampler)
    n = 30000
    picks = Counter(s.sample() for _ in range(n))
    assert picks[3] == 0 and all(abs(picks[k] / n - p) < 0.012 for k, p in {0: 0.25, 1: 0.25, 2: 0.5}.items()), picks
    state = s.state_dict()
    ahead = [s.sample() for _ in range(50)]
    again = WeightedSampler([1, 1, 2, 0], seed=9)
    again.load_state_dict(state)
    assert [again.sample() for _ in range(50)] == ahead
    with pytest.raises(snnet.CheckpointError, match="weighted the stitches differently"):
        WeightedSampler([1, 1, 3, 0]).load_state_dict(state)
    for bad in ([0, 0], [1, -1], [1, float("nan")]):
        with pytest.raises(snnet.SnnetError, match="non-negative weight"):
            WeightedSampler(bad)
    with pytest.raises(snnet.SnnetError, match="a weight for every stitch"):
        make_stitch_sampler("weighted", 4, 0, weights=[1, 2])


def test_weighted_stitches_by_name_or_id_from_the_config() -> None:
    net = seeded_net(anchors=TINY_VITS[:2])
    name = net.space[3].name
    conf = TrainConfig().override(progress=False, sampler="weighted", weighted_stitches=[name, 1], stitch_weight=3)
    trainer = Trainer(net, conf, total_steps=1)
    want = [3.0 if i in (1, 3) else 1.0 for i in range(len(net.space))]
    assert trainer.sampler.weights.tolist() == want
    with pytest.raises(ConfigError, match="needs sampling.weighted_stitches"):
        TrainConfig().override(sampler="weighted")
    with pytest.raises(ConfigError, match="stitch_weight must be > 0"):
        TrainConfig().override(stitch_weight=0)
    with pytest.raises(ConfigError, match="names a stitch twice"):
        Trainer(net, conf.override(weighted_stitches=[name, 3]), total_steps=1)
    with pytest.raises(ConfigError, match="sampling.weighted_stitches: no stitch named 'nope'.*uniform"):
        Trainer(net, conf.override(weighted_stitches=["nope"]), total_steps=1)
    with pytest.raises(ConfigError, match="sampling.weighted_stitches: stitch id 99 is out of range"):
        Trainer(net, conf.override(weighted_stitches=[99]), total_steps=1)


def test_seeded_items_take_numpy_and_torch_indices() -> None:
    # a sampler over a numpy array of indices (SubsetRandomSampler) hands out numpy integers: mix_seed overflowed
    # on them, and a torch integer wrapped in 64 bits and drew another augmentation than the same int index
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    from snnet.sampling import SeededItems, mix_seed

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(3)

    items = SeededItems(Noisy(), seed=3)
    want = items[5]
    assert torch.equal(items[np.int64(5)], want) and torch.equal(items[torch.tensor(5)], want)
    assert mix_seed(np.int64(1), torch.tensor(2), 3) == mix_seed(1, 2, 3)
