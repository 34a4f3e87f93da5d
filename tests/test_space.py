"""snnet.space: which routes a family has (SN-Net's stitches, SN-Netv2's two-way routes and chains),
their names and route files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import snnet
from snnet.sampling import make_stitch_sampler, ros_groups
from snnet.space import Segment, paired_pairs, parse_route, route_name, two_way_positions, unpaired_pairs

from .conftest import TINY_VITS, route_kind, seeded_net, _by_hand


def test_matched_positions() -> None:
    assert two_way_positions(12, 24) == [(k, 2 * k) for k in range(1, 12)]
    assert two_way_positions(4, 4) == [(1, 1), (2, 2), (3, 3)]
    assert two_way_positions(8, 4) == [(2, 1), (4, 2), (6, 3)]


def test_deit3_small_large_space_matches_snnetv2() -> None:
    """SN-Netv2's DeiT3-S/L space: 134 networks, 4.61-61.60 GFLOPs at 224 (meta device: no weights)."""
    net = snnet.create_snnet(["deit3_small_patch16_224", "deit3_large_patch16_224"], two_way=True, device="meta")
    flops = [c.flops for c in net.costs()]
    assert len(net.space) == 134
    assert Counter(route_kind(net, s) for s in net.space) == {"S": 1, "L": 1, "S-L": 11, "L-S": 11, "L-S-L": 55, "S-L-S": 55}
    assert (round(min(flops) / 1e9, 2), round(max(flops) / 1e9, 2)) == (4.61, 61.60)
    assert len(net.stitch_layers) == 22  # 11 per direction; round trips reuse them
    # ROS's default gap (a share of the range) groups this space as the authors' 1 GFLOP does: 13 groups
    ros = make_stitch_sampler("ros", len(flops), 0, flops)
    assert ros.groups == ros_groups(flops, 1e9) and len(ros.groups) == 13
    assert net.stitch("deit3_small_patch16_224[:4]+deit3_large_patch16_224[8:16]+deit3_small_patch16_224[8:]").layers \
        == (3, 11 + 7)


def test_tiny_two_way_space() -> None:
    net = seeded_net(two_way=True)
    # 3 anchors, per neighbouring pair (depth 4: positions 1..3): 3 + 3 one-way, 3 + 3 round trips
    assert len(net.space) == 3 + 2 * 12
    assert len(net.stitch_layers) == 2 * 6
    by_kind = Counter(route_kind(net, s) for s in net.space if s.anchors[0] != 2 and 2 not in s.anchors)
    assert by_kind == {"S": 1, "L": 1, "S-L": 3, "L-S": 3, "L-S-L": 3, "S-L-S": 3}
    # each direction has its own layers; every route's layers map the anchors it joins
    for s in net.space:
        for before, layer, after in s.joins():
            slot = net.space.layers[layer]
            assert (slot.src, slot.dst) == (before.anchor, after.anchor)
            assert (before.stop, after.start) in slot.joins
    # unequal depths (4 and 8 blocks): the deeper anchor is cut at twice the position
    deep = seeded_net(anchors=["snnet_tiny_vit_s", "snnet_tiny_vit_deep"], two_way=True)
    names = [s.name for s in deep.space if len(s.segments) == 2]
    assert names[:3] == [f"snnet_tiny_vit_s[:{k}]+snnet_tiny_vit_deep[{2 * k}:]" for k in (1, 2, 3)]
    assert names[3:] == [f"snnet_tiny_vit_deep[:{2 * k}]+snnet_tiny_vit_s[{k}:]" for k in (1, 2, 3)]


def test_chains_are_the_references_three_anchor_routes() -> None:
    v1, net = seeded_net(), seeded_net(chains=True)
    joins = [(i + 1, j) for g in paired_pairs(4) for i, j in g]
    # Ti[:e1] + S[s1:e2] + B[s2:], at least one block of S
    expected = sum(1 for _, s1 in joins for e2, _ in joins if e2 > s1)
    chains = [s for s in net.space if len(s.segments) == 3]
    assert len(chains) == expected and len(net.space) == len(v1.space) + expected
    assert [s.name for s in net.space][:len(v1.space)] == [s.name for s in v1.space]  # v1 ids unchanged
    assert len(net.stitch_layers) == len(v1.stitch_layers)  # chains reuse the one-way layers
    for s in chains:
        first = net.stitch(route_name(net.labels, (s.segments[0], Segment(1, s.segments[1].start, 4))))
        second = net.stitch(route_name(net.labels, (Segment(1, 0, s.segments[1].stop), s.segments[2])))
        assert s.layers == (first.layer, second.layer)


def test_route_names_read_back() -> None:
    net = seeded_net(two_way=True, chains=True)
    depths = [a.depth for a in net.anchors]
    for s in net.space:
        assert parse_route(s.name, net.labels, depths) == s.segments
    for bad in ["snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[9:]", "snnet_tiny_vit_ti[1:2]+snnet_tiny_vit_s[2:]",
                "snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[2:3]", "nope[:1]+snnet_tiny_vit_s[1:]", "snnet_tiny_vit_ti[:2]"]:
        with pytest.raises(snnet.StitchNotFoundError):
            parse_route(bad, net.labels, depths)


def test_explicit_routes() -> None:
    routes = ["snnet_tiny_vit_b[:2]+snnet_tiny_vit_ti[2:]", "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:3]+snnet_tiny_vit_b[3:]",
              "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:]"]
    net = seeded_net(routes=routes)
    assert [s.name for s in net.space] == TINY_VITS + routes
    # one layer per distinct join: the Ti->S join at (1, 1) serves two routes
    assert len(net.stitch_layers) == 3
    assert net.stitch(routes[1]).layers[0] == net.stitch(routes[2]).layers[0]
    with pytest.raises(snnet.NotStitchableError, match="listed twice"):
        seeded_net(routes=routes + routes[:1])
    with pytest.raises(snnet.NotStitchableError, match="itself"):
        seeded_net(routes=["snnet_tiny_vit_ti[:1]+snnet_tiny_vit_ti[2:]"])


def test_routes_files(tmp_path) -> None:
    from snnet.commands.options import read_routes, read_routes_file

    names = ["snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:]", "snnet_tiny_vit_b[:2]+snnet_tiny_vit_ti[2:]"]
    (tmp_path / "klas.json").write_text(json.dumps({"routes": names, "candidates": []}))
    (tmp_path / "list.json").write_text(json.dumps(names))
    (tmp_path / "routes.txt").write_text("# kept by hand\n" + "\n".join(names) + "\n")
    for f in ("klas.json", "list.json", "routes.txt"):
        assert read_routes(tmp_path / f) == tuple(names)
    assert [s.name for s in seeded_net(routes=read_routes(tmp_path / "routes.txt")).space][3:] == names
    # the cut KLAS chose them with: what `snnet train --routes` checks against space.cut; none in a plain list
    (tmp_path / "sublayer.json").write_text(json.dumps({"routes": names, "cut": "sublayer"}))
    assert [read_routes_file(tmp_path / f).cut for f in ("sublayer.json", "klas.json", "list.json", "routes.txt")] == \
        ["sublayer", None, None, None]
    (tmp_path / "bad.json").write_text(json.dumps({"stitches": []}))
    (tmp_path / "badcut.json").write_text(json.dumps({"routes": names, "cut": "layer"}))
    for bad in ("bad.json", "missing.json", "badcut.json"):
        with pytest.raises(snnet.SnnetError, match="--routes"):
            read_routes(tmp_path / bad)


def test_two_way_across_kinds_of_model(images: torch.Tensor) -> None:
    """ResNet-18 <-> Swin-T: two directions through layouts (NCHW maps, NHWC maps), per stage."""
    net = seeded_net(anchors=["snnet_tiny_resnet18", "snnet_tiny_swin_t"], two_way=True)
    net.init_stitching([images], max_images=6)
    net.eval()
    assert {s.anchors for s in net.space} >= {(0, 1), (1, 0), (0, 1, 0), (1, 0, 1)}
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            out = net(images)
            assert out.shape == (6, 10) and torch.isfinite(out).all() and torch.equal(out, _by_hand(net, s, images)), s.name


# ----------------------------------------------------------------- enumeration


def test_paired_windows_match_the_paper() -> None:
    groups = paired_pairs(12, kernel_size=2, stride=1)
    pairs = [p for g in groups for p in g]
    assert len(pairs) == 34 and len(set(pairs)) == 34
    assert len(groups) == 11  # one shared stitching layer per window
    assert groups[0] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert groups[1] == [(1, 2), (2, 1), (2, 2)]
    # every pair lies within one window of 2 consecutive blocks
    assert all(abs(i - j) <= 1 for i, j in pairs)


def test_window_options_change_the_space() -> None:
    assert sum(len(g) for g in paired_pairs(4, kernel_size=2, stride=1)) == 10
    assert sum(len(g) for g in paired_pairs(4, kernel_size=2, stride=2)) == 8  # disjoint windows
    assert sum(len(g) for g in paired_pairs(4, kernel_size=3, stride=1)) == 4 * 4 - 2  # |i-j|<=2


def _authors_unpaired(front: int, end: int) -> list[tuple[int, int]]:
    """The authors' unpaired rule, rebuilt from its definition: torch's nearest interpolation
    maps each of the ``end`` target blocks to a front block; every target block mapped to
    front block ``i`` and lying after it is a stitch (front through ``i``, target from it)."""
    mapped = torch.nn.functional.interpolate(torch.arange(front, dtype=torch.float)[None, None], end)[0, 0].long().tolist()
    return [(i, k) for i in range(front) for k, m in enumerate(mapped) if m == i and k > i]


def test_unpaired_default_is_the_authors_rule() -> None:
    pairs = [p for g in unpaired_pairs(12, 24) for p in g]
    assert pairs == _authors_unpaired(12, 24)
    assert len(pairs) == 23 and pairs[:4] == [(0, 1), (1, 2), (1, 3), (2, 4)]
    assert all(len(g) == 1 for g in unpaired_pairs(12, 24))  # one layer each
    assert [p for g in unpaired_pairs(6, 18) for p in g] == _authors_unpaired(6, 18)
    # a deeper source: the same relation transposed, the target resuming inside its depth
    deeper_first = [p for g in unpaired_pairs(8, 4) for p in g]
    assert deeper_first[0] == (0, 1) and all(0 < j < 4 for _, j in deeper_first)


def test_unpaired_progress_rule_is_still_selectable() -> None:
    pairs = [p for g in unpaired_pairs(12, 24, "progress") for p in g]
    # source cut after block i resumes the deeper target where it has done the same share
    assert len(pairs) == 11 and pairs[:3] == [(0, 2), (1, 4), (2, 6)]
    assert all(j == 2 * (i + 1) for i, j in pairs)
    deeper_first = [p for g in unpaired_pairs(8, 4, "progress") for p in g]
    assert deeper_first[0] == (0, 1) and all(0 < j < 4 for _, j in deeper_first)
    with pytest.raises(ValueError, match="unknown unpaired rule"):
        unpaired_pairs(4, 8, "fancy")


def test_tiny_family_space(tiny_net: snnet.StitchedNet) -> None:
    space = tiny_net.space
    # 3 anchors + 2 pairs x 10 pairs of blocks (depth 4, kernel 2, stride 1)
    assert len(space) == 3 + 2 * 10
    assert [s.name for s in space.anchor_stitches()] == TINY_VITS
    # nearest rule: Ti->S and S->B only
    assert {(s.src, s.dst) for s in space if not s.is_anchor} == {(0, 1), (1, 2)}
    # windows share layers: 4 windows... 3 with new pairs per pair of anchors
    assert len(tiny_net.stitch_layers) == 2 * 3
    first_layer = space.layer_stitches(0)
    assert [(s.src_end, s.dst_start) for s in first_layer] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [s.id for s in space] == list(range(len(space)))


def test_all_pairs_option_adds_ti_to_b() -> None:
    net = snnet.create_snnet(TINY_VITS, nearest=False)
    assert {(s.src, s.dst) for s in net.space if not s.is_anchor} == {(0, 1), (1, 2), (0, 2)}
    assert len(net.space) == 3 + 3 * 10


def test_unequal_depths_use_the_authors_mapping(tmp_path) -> None:
    net = snnet.create_snnet(["snnet_tiny_vit_s", "snnet_tiny_vit_deep"])
    routes = [(s.src_end, s.dst_start) for s in net.space if not s.is_anchor]
    assert routes == [(i + 1, j) for i, j in _authors_unpaired(4, 8)]
    assert routes == [(1, 1), (2, 2), (2, 3), (3, 4), (3, 5), (4, 6), (4, 7)]
    assert len(net.stitch_layers) == 7
    old = snnet.create_snnet(["snnet_tiny_vit_s", "snnet_tiny_vit_deep"], unpaired="progress")
    assert [(s.src_end, s.dst_start) for s in old.space if not s.is_anchor] == [(1, 2), (2, 4), (3, 6)]
    # a network saved before the option existed (no "unpaired" key) loads with the rule it was built with
    old.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["space"]["unpaired"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert len(snnet.load(tmp_path / "old").space) == len(old.space)


def test_anchors_are_ordered_by_cost_and_stitch_ids_are_stable() -> None:
    a = snnet.create_snnet(["snnet_tiny_vit_b", "snnet_tiny_vit_ti", "snnet_tiny_vit_s"])
    b = snnet.create_snnet(TINY_VITS)
    assert a.labels == b.labels == tuple(TINY_VITS)
    assert [s.name for s in a.space] == [s.name for s in b.space]


def _stacked(stages: tuple[int, ...], rule: str = "window") -> snnet.AnchorParts:
    """An anchor of identity units on 2x2 maps, with ``stages`` blocks per stage."""
    from torch import nn

    return snnet.AnchorParts(nn.Identity(), [nn.Identity() for _ in range(sum(stages))],
                             nn.Sequential(nn.Flatten(1), nn.Linear(12, 3)), layout="nchw", stages=stages, stitch_rule=rule)


def test_anchors_without_blocks_are_refused_in_one_line() -> None:
    """An anchor (or a stage) with no blocks: no IndexError from the unpaired rule, no empty reason."""
    import timm

    from snnet.errors import NotStitchableError

    vit = [timm.create_model("vit_tiny_patch16_224", img_size=32, depth=d) for d in (0, 2)]
    with pytest.raises(NotStitchableError, match=r"^anchor 'visiontransformer0' has no blocks"):
        snnet.create_snnet(vit, img_size=32)
    # a stage without blocks in one anchor: the other stages are still stitched
    net = snnet.StitchedNet([_stacked((2, 0)), _stacked((2, 2))], ["a", "b"], input_size=(3, 2, 2))
    assert {(s.src_end, s.dst_start) for s in net.space if not s.is_anchor} <= {(e, st) for e in (1, 2) for st in (0, 1)}
    # positions that line up but that the rule pairs none of: the reason says so
    with pytest.raises(NotStitchableError, match=r"cannot be stitched anywhere: the 'forward' rule pairs no blocks of stage"):
        snnet.StitchedNet([_stacked((1,), "forward"), _stacked((1,), "forward")], ["a", "b"], input_size=(3, 2, 2))


def test_one_route_given_as_text_is_refused_clearly() -> None:
    """routes="a[:2]+b[2:]" was read letter by letter: "cannot read route 's'"."""
    from snnet.errors import ConfigError

    route = "snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[2:]"
    with pytest.raises(ConfigError, match=r"routes is a list, got the text .*: pass \['snnet_tiny_vit_ti\[:2\]"):
        snnet.create_snnet(TINY_VITS[:2], routes=route)
    assert [s.name for s in snnet.create_snnet(TINY_VITS[:2], routes=[route]).space][2:] == [route]
    with pytest.raises(ConfigError, match=r"stages is a list, got 1: pass \[1\]"):  # was a bare TypeError
        snnet.create_snnet(TINY_VITS[:2], stages=1)


def test_numpy_and_torch_integers_name_a_stitch() -> None:
    """net.select(numpy.int64(3)) (an id from an argmax, a results array) was refused: "not int64"."""
    import numpy as np

    net = snnet.create_snnet(TINY_VITS[:2])
    assert net.select(np.int64(3)).id == 3 and net.stitch(torch.tensor(2)).id == 2
    with pytest.raises(snnet.StitchNotFoundError, match="out of range"):
        net.select(np.int32(99))


def test_stages_that_do_not_exist_are_named_in_the_error() -> None:
    """stages=[7] on one-stage ViTs said "they share no stitchable stage (stages (0,) vs (0,))"."""
    with pytest.raises(snnet.NotStitchableError, match=r"stages=\[7\] names no stage both have \(snnet_tiny_vit_ti has 1"):
        snnet.create_snnet(TINY_VITS[:2], stages=[7])


def test_negative_or_repeated_stages_give_a_clear_error_or_their_stage_once() -> None:
    """stages=[-5] failed with a bare IndexError inside StitchSpace, and a stage named twice ([2, 2], or [2, -2]
    of four stages) with "the route ... is listed twice; name each stitch once", as if routes had been listed."""
    from snnet.errors import ConfigError, NotStitchableError

    swins = ["snnet_tiny_swin_t", "snnet_tiny_swin_s"]
    with pytest.raises(ConfigError, match=r"stages are distinct stage numbers \(the first stage is 0\), got \[2, 2\]"):
        snnet.create_snnet(swins, stages=[2, 2])
    with pytest.raises(NotStitchableError, match=r"stages=\[-5\] names no stage both have"):
        snnet.create_snnet(swins, stages=[-5])
    names = [s.name for s in snnet.create_snnet(swins, stages=[2]).space]
    assert len(names) == 2 + 5
    assert [s.name for s in snnet.create_snnet(swins, stages=[2, -2]).space] == names
    assert [s.name for s in snnet.create_snnet(swins, stages=[-2]).space] == names  # as saved networks were built


def test_two_way_space_with_no_matched_position_says_so() -> None:
    """Anchors of one block each have no matched position (k = 1 .. d-1): the reason blamed the 'window' rule,
    which the two-way space does not use (the same anchors without two_way have a stitch)."""
    from snnet.errors import NotStitchableError

    anchors = [_stacked((1,)), _stacked((1,))]
    assert len(snnet.StitchedNet(anchors, ["a", "b"], input_size=(3, 2, 2)).space) == 3
    with pytest.raises(NotStitchableError, match=r"cannot be stitched anywhere: the two-way space cuts at the matched "
                                                 r"positions 1 \.\. d-1") as e:
        snnet.StitchedNet(anchors, ["a", "b"], config=snnet.SpaceConfig(two_way=True), input_size=(3, 2, 2))
    assert "rule" not in str(e.value)


def test_two_way_round_trips_follow_depth_whatever_the_order_of_stages() -> None:
    """stages=[2, 1] listed stage 2's positions first: round trips went back to an earlier position
    (snnet_tiny_swin_s[:7]+snnet_tiny_swin_t[5:3]+..., a segment of no block whose name does not read back;
    forward raised a shape error) and the valid trips from stage 1 to stage 2 were missing."""
    ordered = snnet.create_snnet(["snnet_tiny_swin_t", "snnet_tiny_swin_s"], two_way=True, stages=[1, 2])
    reverse = snnet.create_snnet(["snnet_tiny_swin_t", "snnet_tiny_swin_s"], two_way=True, stages=[2, 1])
    assert all(seg.start < seg.stop for s in reverse.space for seg in s.segments)
    assert sorted(s.name for s in reverse.space) == sorted(s.name for s in ordered.space)
    assert any(len(s.segments) == 3 for s in reverse.space)
