"""SN-Netv2 (two-way routes, low-rank stitching layers, ROS) and KLAS, on tiny families."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

import snnet
from snnet import deploy
from snnet.anchors import ActivationSpec
from snnet.deploy import export as deploy_export
from snnet.evaluate import evaluate
from snnet.klas import KlasScore, candidates, klas, klas_net, klas_scores, select_klas
from snnet.sampling import ResourceSampler, make_stitch_sampler, ros_groups
from snnet.space import Segment, paired_pairs, parse_route, route_name, two_way_positions
from snnet.stitching import StitchingLayer
from snnet.config import TrainConfig
from snnet.train import Trainer, route_modules

from .conftest import TINY_VITS, Synthetic, _batches, _naive


def _net(**kw) -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(kw.pop("anchors", TINY_VITS), **kw)


def _fitted(**kw) -> snnet.StitchedNet:
    """Least-squares layers, then a nudge, so that every layer and stitch computes something different."""
    net = _net(**kw)
    net.init_stitching([torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))], max_images=16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for layer in net.stitch_layers:
            for p in ([layer.lora_a, layer.lora_b] if layer.rank else [layer.proj.weight]):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def _kind(net: snnet.StitchedNet, s: snnet.Stitch) -> str:
    return "-".join("SL"[a] for a in s.anchors)


# ----------------------------------------------------------------- enumeration


def test_matched_positions() -> None:
    assert two_way_positions(12, 24) == [(k, 2 * k) for k in range(1, 12)]
    assert two_way_positions(4, 4) == [(1, 1), (2, 2), (3, 3)]
    assert two_way_positions(8, 4) == [(2, 1), (4, 2), (6, 3)]


def test_deit3_small_large_space_matches_snnetv2() -> None:
    """SN-Netv2's DeiT3-S/L space: 134 networks, 4.61-61.60 GFLOPs at 224 (meta device: no weights)."""
    net = snnet.create_snnet(["deit3_small_patch16_224", "deit3_large_patch16_224"], two_way=True, device="meta")
    flops = [c.flops for c in net.costs()]
    assert len(net.space) == 134
    assert Counter(_kind(net, s) for s in net.space) == {"S": 1, "L": 1, "S-L": 11, "L-S": 11, "L-S-L": 55, "S-L-S": 55}
    assert (round(min(flops) / 1e9, 2), round(max(flops) / 1e9, 2)) == (4.61, 61.60)
    assert len(net.stitch_layers) == 22  # 11 per direction; round trips reuse them
    # ROS's default gap (a share of the range) groups this space as the authors' 1 GFLOP does: 13 groups
    ros = make_stitch_sampler("ros", len(flops), 0, flops)
    assert ros.groups == ros_groups(flops, 1e9) and len(ros.groups) == 13
    assert net.stitch("deit3_small_patch16_224[:4]+deit3_large_patch16_224[8:16]+deit3_small_patch16_224[8:]").layers \
        == (3, 11 + 7)


def test_tiny_two_way_space() -> None:
    net = _net(two_way=True)
    # 3 anchors, per neighbouring pair (depth 4: positions 1..3): 3 + 3 one-way, 3 + 3 round trips
    assert len(net.space) == 3 + 2 * 12
    assert len(net.stitch_layers) == 2 * 6
    by_kind = Counter(_kind(net, s) for s in net.space if s.anchors[0] != 2 and 2 not in s.anchors)
    assert by_kind == {"S": 1, "L": 1, "S-L": 3, "L-S": 3, "L-S-L": 3, "S-L-S": 3}
    # each direction has its own layers; every route's layers map the anchors it joins
    for s in net.space:
        for before, layer, after in s.joins():
            slot = net.space.layers[layer]
            assert (slot.src, slot.dst) == (before.anchor, after.anchor)
            assert (before.stop, after.start) in slot.joins
    # unequal depths (4 and 8 blocks): the deeper anchor is cut at twice the position
    deep = _net(anchors=["snnet_tiny_vit_s", "snnet_tiny_vit_deep"], two_way=True)
    names = [s.name for s in deep.space if len(s.segments) == 2]
    assert names[:3] == [f"snnet_tiny_vit_s[:{k}]+snnet_tiny_vit_deep[{2 * k}:]" for k in (1, 2, 3)]
    assert names[3:] == [f"snnet_tiny_vit_deep[:{2 * k}]+snnet_tiny_vit_s[{k}:]" for k in (1, 2, 3)]


def test_chains_are_the_references_three_anchor_routes() -> None:
    v1, net = _net(), _net(chains=True)
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
    net = _net(two_way=True, chains=True)
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
    net = _net(routes=routes)
    assert [s.name for s in net.space] == TINY_VITS + routes
    # one layer per distinct join: the Ti->S join at (1, 1) serves two routes
    assert len(net.stitch_layers) == 3
    assert net.stitch(routes[1]).layers[0] == net.stitch(routes[2]).layers[0]
    with pytest.raises(snnet.NotStitchableError, match="listed twice"):
        _net(routes=routes + routes[:1])
    with pytest.raises(snnet.NotStitchableError, match="itself"):
        _net(routes=["snnet_tiny_vit_ti[:1]+snnet_tiny_vit_ti[2:]"])


# ----------------------------------------------------------------- forward


def _by_hand(net: snnet.StitchedNet, s: snnet.Stitch, x: torch.Tensor) -> torch.Tensor:
    h = net.anchors[s.segments[0].anchor].stem(x)
    for k, seg in enumerate(s.segments):
        if k:
            h = net.stitch_layers[s.layers[k - 1]](h)
        for blk in net.anchors[seg.anchor].blocks[seg.start:seg.stop]:
            h = blk(h)
    return net.anchors[s.segments[-1].anchor].head(h)


def test_large_to_small_and_round_trips_equal_their_segments_by_hand(images: torch.Tensor) -> None:
    net = _fitted(two_way=True, chains=True)
    kinds = set()
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            assert torch.equal(net(images), _by_hand(net, s, images)), s.name
            kinds.add(s.anchors)
    assert {(1, 0), (0, 1, 0), (1, 0, 1), (0, 1, 2)} <= kinds  # L->S, both round trips, Ti->S->B


def test_round_trip_runs_only_its_route(images: torch.Tensor) -> None:
    net = _net(two_way=True)
    s = net.select("snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]")
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, m in net.named_modules() if name.count(".") in (1, 3) and name.startswith(("anchors", "stitch_layers"))]
    net(images)
    for h in hooks:
        h.remove()
    blocks = {n for n in called if ".blocks." in n}
    assert blocks == {"anchors.1.blocks.0", "anchors.2.blocks.1", "anchors.2.blocks.2", "anchors.1.blocks.3"}
    assert {n for n in called if n.startswith("stitch_layers")} == {f"stitch_layers.{k}" for k in s.layers}


# ----------------------------------------------------------------- costs, init, training mask


def test_multi_segment_costs_sum_their_parts() -> None:
    net = _net(two_way=True, chains=True)
    pcs, costs = net.part_costs(), net.costs()
    for s in net.space:
        modules = route_modules(net, s)
        assert costs[s.id].params == sum(p.numel() for m in modules for p in m.parameters()), s.name
        blocks = sum(pcs[seg.anchor].route(seg.start, seg.stop, False, False)[0] for seg in s.segments)
        ends = pcs[s.src].stem_flops + pcs[s.anchors[-1]].head_flops
        layers = sum(net.space.layers[k].src_spec.positions * net.space.layers[k].src_spec.channels
                     * net.space.layers[k].dst_spec.channels for k in s.layers)
        assert costs[s.id].flops == blocks + ends + layers, s.name


def test_least_squares_fits_both_directions(images: torch.Tensor) -> None:
    net = _net(two_way=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    down = [slot for slot in net.space.layers if slot.src > slot.dst]
    assert down

    def mse() -> list[float]:
        out = []
        for slot in down:
            (e, st), = slot.joins
            x, y = net.activations(slot.src, calib)[e], net.activations(slot.dst, calib)[st]
            with torch.no_grad():
                out.append(float(((net.stitch_layers[slot.index](x) - y) ** 2).mean()))
        return out

    before = mse()
    report = net.init_stitching([calib], max_images=16)
    assert report.layers == len(net.stitch_layers)
    assert all(a < 0.7 * b for a, b in zip(mse(), before))


def test_training_mask_covers_exactly_the_route() -> None:
    net = _net(two_way=True, lora_rank=2)
    trainer = Trainer(net, TrainConfig().override(progress=False), total_steps=1)
    s = net.stitch("snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]")
    used = trainer._used(s)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    on = {n for n, u in zip(names, used.tolist()) if u}
    want_prefixes = ("anchors.1.stem.", "anchors.1.blocks.0.", "anchors.2.blocks.1.", "anchors.2.blocks.2.",
                     "anchors.1.blocks.3.", "anchors.1.head.") + tuple(f"stitch_layers.{k}." for k in s.layers)
    assert on == {n for n in names if n.startswith(want_prefixes)}
    assert any(n.endswith("lora_b") for n in on)
    assert not any(n.startswith("stitch_layers.") and n.endswith("proj.weight") for n in names)  # frozen


# ----------------------------------------------------------------- low-rank stitching layers


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_low_rank_layer_merges_into_one_plain_layer(layout: str) -> None:
    spatial = (5,) if layout == "tokens" else (3, 3)
    src, dst = ActivationSpec(layout, 6, spatial), ActivationSpec(layout, 10, spatial)
    torch.manual_seed(0)
    layer = StitchingLayer(src, dst, rank=3, alpha=2.0)
    assert not layer.proj.weight.requires_grad and layer.lora_a.requires_grad and layer.proj.bias.requires_grad
    assert torch.count_nonzero(layer.lora_a) == layer.lora_a.numel() and torch.count_nonzero(layer.lora_b) == 0
    x = torch.randn(4, *((5, 6) if layout == "tokens" else (6, 3, 3)))
    with torch.no_grad():
        base = nn.functional.linear(x, layer.proj.weight, layer.proj.bias) if layout == "tokens" else layer.proj(x)
        assert torch.equal(layer(x), base)  # B = 0: exactly the least-squares layer
        layer.lora_b.normal_()
    merged = layer.merged()
    assert merged.rank == 0 and set(dict(merged.named_parameters())) == {"proj.weight", "proj.bias"}
    with torch.no_grad():
        assert not torch.allclose(layer(x), base)
        torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-6)
        w = layer.proj.weight.reshape(10, 6) + (2.0 / 3) * layer.lora_b @ layer.lora_a
        torch.testing.assert_close(merged.proj.weight.reshape(10, 6), w)


def test_low_rank_training_moves_only_the_update(tmp_path) -> None:

    net = _net(anchors=TINY_VITS[:2], lora_rank=2)
    net.init_stitching([torch.randn(8, 3, 32, 32)], max_images=8)
    base = [layer.proj.weight.clone() for layer in net.stitch_layers]
    lora_b = [layer.lora_b.clone() for layer in net.stitch_layers]
    assert all(torch.count_nonzero(b) == 0 for b in lora_b)
    trainer = Trainer(net, TrainConfig().override(progress=False, sampler="uniform"), total_steps=20)
    x, y = Synthetic(8).tensors
    for _ in range(20):
        trainer.step(x, y)
    assert all(torch.equal(a, layer.proj.weight) for a, layer in zip(base, net.stitch_layers))
    assert any(torch.count_nonzero(layer.lora_b) for layer in net.stitch_layers)


def test_low_rank_costs_save_load_and_set_rank(images: torch.Tensor, tmp_path) -> None:
    plain, low = _net(two_way=True), _fitted(two_way=True, lora_rank=2, lora_alpha=4.0)
    # priced as deployed: merged into plain layers
    assert [(c.flops, c.params) for c in low.costs()] == [(c.flops, c.params) for c in plain.costs()]
    low.select(9)
    low.save_pretrained(tmp_path / "net")
    cfg = json.loads((tmp_path / "net" / "config.json").read_text())
    assert cfg["version"] == 2 and cfg["stitching"] == {"lora_rank": 2, "lora_alpha": 4.0} and cfg["space"]["two_way"]
    loaded = snnet.load(tmp_path / "net").eval()
    assert loaded.active.id == 9 and loaded.lora_rank == 2
    outs = {}
    for s in low.space:
        low.select(s), loaded.select(s)
        outs[s.id] = low(images)
        assert torch.equal(outs[s.id], loaded(images)), s.name
    low.set_lora_rank(0)  # merge every update in: the same networks, plain layers
    assert all(layer.rank == 0 for layer in low.stitch_layers)
    for s in low.space:
        low.select(s)
        torch.testing.assert_close(low(images), outs[s.id], rtol=0, atol=1e-5)


# ----------------------------------------------------------------- save / load / export / eval of v2 routes


def test_v1_configs_still_load(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    tiny_net.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["version"] == 1 and "stitching" not in cfg
    for key in ("two_way", "chains", "routes"):  # what snnet wrote before v2
        del cfg["space"][key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = snnet.load(tmp_path)
    assert [s.name for s in loaded.space] == [s.name for s in tiny_net.space]


def test_export_of_v2_routes_equals_the_network(images: torch.Tensor, tmp_path) -> None:
    net = _fitted(two_way=True, chains=True, lora_rank=2)
    picks = ["snnet_tiny_vit_b[:2]+snnet_tiny_vit_s[2:]", "snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]",
             "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:3]+snnet_tiny_vit_b[3:]", "snnet_tiny_vit_b"]
    for name in picks:
        s = net.stitch(name)
        with torch.no_grad():
            net.select(s)
            want = net(images)
        route = deploy.extract(net, s)
        assert not any("lora" in k for k in route.state_dict())  # shipped merged
        assert len(route.via) == len(s.segments) - 2 if len(s.segments) > 1 else not route.via
        out = tmp_path / str(s.id)
        deploy.save_stitch(route, out, deploy.stitch_config(net, s))
        loaded = deploy.load_stitch(out)
        with torch.inference_mode():
            assert (route(images) - want).abs().max() <= 1e-5, name
            assert (loaded(images) - want).abs().max() <= 1e-5, name
        cfg = json.loads((out / "config.json").read_text())
        assert len(cfg["segments"]) == len(s.segments) and len(cfg["stitching_layers"]) == len(s.layers)
        assert len(cfg["anchors"]) == len(set(s.anchors))


def test_v1_stitch_exports_still_load(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    """A stitch exported before v2 (config version 1) loads into the same route."""
    s = tiny_net.stitch("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[1:]")
    route = deploy.extract(tiny_net, s)
    new = deploy.stitch_config(tiny_net, s)
    old = {k: v for k, v in new.items() if k not in ("anchors", "segments", "stitching_layers")}
    old.update(version=1, src=new["anchors"][0], src_end=2, dst=new["anchors"][1], dst_start=1,
               stitching_layer=new["stitching_layers"][0])
    deploy.save_stitch(route, tmp_path, old)
    with torch.inference_mode():
        assert torch.equal(deploy.load_stitch(tmp_path)(images), route(images))
    assert deploy.route_bytes(deploy_export._route_view(tiny_net, s)) == deploy.route_bytes(route)


def test_shared_prefix_eval_equals_each_v2_route_alone() -> None:

    net = _fitted(two_way=True, chains=True)
    blocks = [0]
    for a in net.anchors:
        for blk in a.blocks:
            blk.register_forward_hook(lambda *_: blocks.__setitem__(0, blocks[0] + 1))
    batches = _batches()
    results = evaluate(net, batches, progress=False)
    shared = blocks[0]
    for r in results:
        acc1, acc5, loss = _naive(net, batches, r.id)
        assert r.acc1 == pytest.approx(acc1, abs=1e-5) and r.acc5 == pytest.approx(acc5, abs=1e-5), r.name
        assert r.loss == pytest.approx(loss, abs=1e-5), r.name
    naive = blocks[0] - shared
    assert shared < 0.75 * naive  # the trie shares prefixes of multi-segment routes too


# ----------------------------------------------------------------- ROS


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
    # from the training config: the gap is a share of the FLOPs range
    assert make_stitch_sampler("ros", 6, 0, flops, ros_gap=2 / 30).groups == s.groups


# ----------------------------------------------------------------- KLAS


def _batches_of_images(n: int = 48, seed: int = 0) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + 16] for i in range(0, n, 16)]


def test_klas_keeps_n_deterministically() -> None:
    net = _net()
    cands = candidates(net)
    assert len(cands) == 6 * 4 * 4  # 6 ordered pairs of anchors, cut after 1..4 blocks, resume at 0..3
    a, b = klas(net, _batches_of_images(), keep=5), klas(net, _batches_of_images(), keep=5)
    assert a == b and len(a.routes) == 5 and sum(s.kept for s in a.scores) == 5
    lo, hi = min(c.flops for c in net.costs()[:3]), max(c.flops for c in net.costs()[:3])
    assert all(lo < s.flops < hi for s in a.scores if s.kept)
    chosen = klas_net(net, a.routes)
    assert [s.name for s in chosen.space][3:] == list(a.routes) and len(chosen.stitch_layers) == 5
    assert {c.name: c.flops for c in chosen.costs()[3:]} == {s.name: s.flops for s in a.scores if s.kept}
    assert a.to_dict()["routes"] == list(a.routes) and len(a.to_dict()["candidates"]) == len(cands)


def test_klas_scores_identical_representations_zero() -> None:
    import timm

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(timm.create_model("snnet_tiny_vit_ti"))
    net = snnet.create_snnet(models, labels=["a", "b"])
    scores = klas_scores(net, _batches_of_images())
    same = [s.kl for s in scores if s.src_end == s.dst_start]
    other = [s.kl for s in scores if s.src_end != s.dst_start]
    assert max(same) < 1e-9 < min(other)


def test_select_klas_spreads_over_the_flops_range() -> None:
    def score(name: str, flops: int, kl: float) -> KlasScore:
        return KlasScore(name, 0, 1, 1, 0, flops, kl)

    scores = [score("a", 5, 0.9), score("b", 12, 0.1), score("c", 14, 0.2), score("d", 25, 0.5), score("e", 99, 0.0)]
    assert [s.name for s in select_klas(scores, 2, 0, 30)] == ["b", "d"]  # the best of each half of (0, 30)
    assert [s.name for s in select_klas(scores, 2, 0, 30, spread=False)] == ["b", "c"]  # e is dearer than the range
    assert [s.name for s in select_klas(scores, 3, 0, 30)] == ["a", "b", "d"]
    with pytest.raises(snnet.SnnetError, match="--keep 4"):
        select_klas(scores, 5, 0, 30)


def test_klas_space_saves_and_loads(images: torch.Tensor, tmp_path) -> None:
    net = _net()
    result = klas(net, _batches_of_images(), keep=4)
    chosen = klas_net(net, result.routes)
    chosen.init_stitching([images], max_images=6)
    chosen.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["space"]["routes"] == list(result.routes)
    loaded = snnet.load(tmp_path).eval()
    chosen.eval()
    for s in chosen.space:
        chosen.select(s), loaded.select(s)
        assert torch.equal(chosen(images), loaded(images))


def test_cli_stitches_two_way_and_klas(capsys, tmp_path) -> None:
    from snnet.cli import main

    main(["stitches", "--anchors", ",".join(TINY_VITS[:2]), "--two-way", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14 and rows[8]["name"] == "snnet_tiny_vit_s[:1]+snnet_tiny_vit_ti[1:2]+snnet_tiny_vit_s[2:]"
    with pytest.raises(SystemExit) as e:
        main(["stitches", "--anchors", ",".join(TINY_VITS), "--select", "kl"])
    assert e.value.code == 2 and "klas" in capsys.readouterr().err


def test_profile_of_v2_routes() -> None:
    net = _net(two_way=True, lora_rank=2)
    names = ["snnet_tiny_vit_b[:2]+snnet_tiny_vit_s[2:]", "snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]"]
    measured, _ = deploy.profile(net, warmup=0, repeats=2, stitches=names, progress=False)
    assert [m.name for m in measured] == names and all(m.latency_ms > 0 and m.peak_mem_mb > 0 for m in measured)
    s = net.stitch(names[1])
    weights = sum(p.numel() * p.element_size() for m in route_modules(net, s) for p in m.parameters())
    assert deploy.route_bytes(deploy_export._route_view(net, s)) == weights + sum(
        b.numel() * b.element_size() for m in route_modules(net, s) for b in m.buffers())


def test_routes_files(tmp_path) -> None:
    from snnet.commands.options import read_routes

    names = ["snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:]", "snnet_tiny_vit_b[:2]+snnet_tiny_vit_ti[2:]"]
    (tmp_path / "klas.json").write_text(json.dumps({"routes": names, "candidates": []}))
    (tmp_path / "list.json").write_text(json.dumps(names))
    (tmp_path / "routes.txt").write_text("# kept by hand\n" + "\n".join(names) + "\n")
    for f in ("klas.json", "list.json", "routes.txt"):
        assert read_routes(tmp_path / f) == tuple(names)
    assert [s.name for s in _net(routes=read_routes(tmp_path / "routes.txt")).space][3:] == names
    (tmp_path / "bad.json").write_text(json.dumps({"stitches": []}))
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(snnet.SnnetError, match="--routes"):
            read_routes(tmp_path / bad)


def test_two_way_across_kinds_of_model(images: torch.Tensor) -> None:
    """ResNet-18 <-> Swin-T: two directions through layouts (NCHW maps, NHWC maps), per stage."""
    net = _net(anchors=["snnet_tiny_resnet18", "snnet_tiny_swin_t"], two_way=True)
    net.init_stitching([images], max_images=6)
    net.eval()
    assert {s.anchors for s in net.space} >= {(0, 1), (1, 0), (0, 1, 0), (1, 0, 1)}
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            out = net(images)
            assert out.shape == (6, 10) and torch.isfinite(out).all() and torch.equal(out, _by_hand(net, s, images)), s.name
