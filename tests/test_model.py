"""The core: stitch space, stitching layers, switching, costs, save/load and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import snnet
from snnet.anchors import AnchorParts, split_model
from snnet.flops import count_macs, unfused_attention
from snnet.space import paired_pairs, unpaired_pairs
from snnet.stitching import LeastSquares, StitchingLayer

from .conftest import TINY_VITS


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


# ----------------------------------------------------------------- running


def test_every_stitch_runs_with_the_right_shape(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    tiny_net.eval()
    outs = {}
    for s in tiny_net.space:
        tiny_net.select(s.id)
        out = tiny_net(images)
        assert out.shape == (len(images), 10) and torch.isfinite(out).all()
        outs[s.id] = out
    assert not torch.equal(outs[3], outs[4])  # different routes, different outputs


def test_anchor_route_equals_the_timm_model(images: torch.Tensor) -> None:
    import timm

    torch.manual_seed(0)
    models = [timm.create_model(n).eval() for n in TINY_VITS]
    net = snnet.create_snnet(models).eval()
    for k, m in enumerate(models):
        net.select(k)
        torch.testing.assert_close(net(images), m(images), rtol=0, atol=0)


def test_parts_cover_every_parameter_once() -> None:
    import timm

    m = timm.create_model("snnet_tiny_vit_s")
    parts = split_model(m)
    assert sum(p.numel() for p in parts.parameters()) == sum(p.numel() for p in m.parameters())


def test_select_changes_the_route_and_nothing_else(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    tiny_net.eval()
    before = {k: (v.data_ptr(), v.clone()) for k, v in tiny_net.state_dict().items()}
    tiny_net.select(0)
    y0 = tiny_net(images)
    chosen = tiny_net.select("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[1:]")
    assert tiny_net.active is chosen and chosen.layer is not None
    y1 = tiny_net(images)
    assert not torch.allclose(y0, y1)
    after = tiny_net.state_dict()
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr, f"{k} was reallocated by select"
        assert torch.equal(after[k], value), f"{k} changed"
    tiny_net.select(0)
    assert torch.equal(tiny_net(images), y0)


def test_forward_runs_only_the_active_route(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    s = tiny_net.select("snnet_tiny_vit_s[:3]+snnet_tiny_vit_b[2:]")
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, m in tiny_net.named_modules() if name.count(".") == 3 and ".blocks." in name]
    tiny_net(images)
    for h in hooks:
        h.remove()
    expected = {f"anchors.1.blocks.{k}" for k in range(s.src_end)} | {f"anchors.2.blocks.{k}" for k in range(s.dst_start, 4)}
    assert called == expected


# ----------------------------------------------------------------- least squares


def _layer_mse(layer: StitchingLayer, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((layer(x) - y) ** 2).mean())


def test_least_squares_beats_a_random_layer(tiny_net: snnet.StitchedNet) -> None:
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    s = tiny_net.stitch("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[2:]")
    layer = tiny_net.stitch_layers[s.layer]
    # the features of every block pair this shared layer serves, pooled as the fit sees them
    pairs = [(tiny_net.activations(t.src, calib)[t.src_end], tiny_net.activations(t.dst, calib)[t.dst_start])
             for t in tiny_net.space.layer_stitches(s.layer)]
    assert len(pairs) == 3

    def pooled_mse() -> float:
        return sum(_layer_mse(layer, x, y) for x, y in pairs) / len(pairs)

    random_mse = pooled_mse()
    report = tiny_net.init_stitching([calib[:8], calib[8:]], max_images=16)
    assert report.images == 16 and report.layers == len(tiny_net.stitch_layers)
    fitted_mse = pooled_mse()
    assert fitted_mse < 0.7 * random_mse
    # and it is the least-squares optimum: any nudge of the weights makes it worse
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        w = layer.proj.weight.clone()
        for _ in range(3):
            layer.proj.weight.copy_(w + 0.01 * torch.randn(w.shape, generator=g))
            assert pooled_mse() > fitted_mse
        layer.proj.weight.copy_(w)


def test_least_squares_recovers_an_exact_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * 3 + 5  # large mean: checks the shifted accumulation
    w, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    fit = LeastSquares(6, 4)
    for chunk in range(0, 500, 100):
        fit.update(x[chunk:chunk + 100], x[chunk:chunk + 100] @ w + b)
    w_hat, b_hat = fit.solve()
    torch.testing.assert_close(w_hat, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b_hat, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
def test_least_squares_is_finite_when_rank_deficient(rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 32, generator=g)
    x[:, 5] = 0.0  # a dead channel
    y = torch.randn(rows, 16, generator=g)
    fit = LeastSquares(32, 16)
    fit.update(x, y)
    w, b = fit.solve()
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    # sensible: it reproduces the few targets it saw
    torch.testing.assert_close(x @ w + b, y, atol=1e-2, rtol=1e-2)


def test_constant_features_give_the_mean() -> None:
    fit = LeastSquares(4, 3)
    fit.update(torch.ones(10, 4), torch.arange(30.0).reshape(10, 3))
    w, b = fit.solve()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(torch.ones(1, 4) @ w + b, torch.arange(30.0).reshape(10, 3).mean(0, keepdim=True))


# ----------------------------------------------------------------- costs


def test_stitch_flops_equal_flops_counted_on_the_running_route(tiny_net: snnet.StitchedNet) -> None:
    x = torch.zeros(1, 3, 32, 32)
    tiny_net.eval()
    costs = tiny_net.costs()
    for s in tiny_net.space:
        tiny_net.select(s.id)
        with unfused_attention(tiny_net):
            counted, _ = count_macs(tiny_net, x)
        assert costs[s.id].flops == counted, s.name
        used = sum(p.numel() for p in tiny_net.anchors[s.src].stem.parameters())
        used += sum(p.numel() for b in tiny_net.anchors[s.src].blocks[:s.src_end] for p in b.parameters())
        last = tiny_net.anchors[s.src] if s.is_anchor else tiny_net.anchors[s.dst]
        if not s.is_anchor:
            used += sum(p.numel() for p in tiny_net.stitch_layers[s.layer].parameters())
            used += sum(p.numel() for b in last.blocks[s.dst_start:] for p in b.parameters())
        used += sum(p.numel() for p in last.head.parameters())
        assert costs[s.id].params == used, s.name


def test_anchor_costs_match_the_model_and_grow_with_input_size() -> None:
    import timm

    net = snnet.create_snnet(TINY_VITS, img_size=64)
    assert net.input_size == (3, 64, 64)
    for k, name in enumerate(TINY_VITS):
        m = timm.create_model(name, img_size=64)
        assert net.costs()[k].params == sum(p.numel() for p in m.parameters())
    small = snnet.create_snnet(TINY_VITS)
    assert all(a.flops > b.flops for a, b in zip(net.costs(), small.costs()))


def test_deit_space_matches_the_paper() -> None:
    """71 networks, 1.26–18.34 GFLOPs at 224 (random init on the meta device: no weights)."""
    net = snnet.create_snnet(["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"], device="meta")
    flops = [c.flops for c in net.costs()]
    assert len(net.space) == 71 and len(net.stitch_layers) == 22
    assert round(min(flops) / 1e9, 2) == 1.26
    assert round(max(flops) / 1e9, 2) == 18.34
    assert [round(c.flops / 1e9, 3) for c in net.costs()[:3]] == [1.258, 4.608, 17.583]


# ----------------------------------------------------------------- save / load


def test_save_load_round_trip(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    tiny_net.init_stitching([images], max_images=6)
    tiny_net.select(7)
    tiny_net.save_pretrained(tmp_path / "net")
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["config.json", "model.safetensors"]
    loaded = snnet.load(tmp_path / "net")
    assert loaded.active.id == 7
    tiny_net.eval(), loaded.eval()
    for s in tiny_net.space:
        tiny_net.select(s.id), loaded.select(s.id)
        assert torch.equal(tiny_net(images), loaded(images)), s.name


def test_save_load_with_own_modules(images: torch.Tensor, tmp_path) -> None:
    import timm

    def family() -> list[nn.Module]:
        return [timm.create_model(n) for n in TINY_VITS[:2]]

    net = snnet.create_snnet(family()).eval()
    net.save_pretrained(tmp_path)
    with pytest.raises(snnet.CheckpointError, match="pass them again"):
        snnet.load(tmp_path)
    loaded = snnet.load(tmp_path, anchors=family()).eval()
    net.select(3), loaded.select(3)
    assert torch.equal(net(images), loaded(images))


# ----------------------------------------------------------------- bad input


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(snnet.UnknownModelError, match="deit_tiny_patch16_224"):
        snnet.create_snnet(["deit_tiny", "deit_small_patch16_224"])


def test_fewer_than_two_anchors() -> None:
    with pytest.raises(snnet.NotStitchableError, match="at least two"):
        snnet.create_snnet(["snnet_tiny_vit_ti"])


def test_different_token_counts_are_refused_with_the_shapes() -> None:
    import timm

    a = timm.create_model("snnet_tiny_vit_ti")
    b = timm.create_model("snnet_tiny_vit_s", patch_size=4)  # 64 patches instead of 16
    with pytest.raises(snnet.NotStitchableError, match=r"token counts differ.*17.*65"):
        snnet.create_snnet([a, b])


def test_different_heads_are_refused() -> None:
    import timm

    a = timm.create_model("snnet_tiny_vit_ti")
    b = timm.create_model("snnet_tiny_vit_s", num_classes=7)
    with pytest.raises(snnet.NotStitchableError, match="classes"):
        snnet.create_snnet([a, b])


def test_unknown_kind_of_model_is_refused() -> None:
    with pytest.raises(snnet.NotStitchableError, match="no adapter"):
        snnet.create_snnet([nn.Linear(2, 2), nn.Linear(2, 2)])


def test_stitch_lookup_errors(tiny_net: snnet.StitchedNet) -> None:
    with pytest.raises(snnet.StitchNotFoundError, match=r"out of range.*0\.\.22"):
        tiny_net.select(23)
    with pytest.raises(snnet.StitchNotFoundError, match="Did you mean"):
        tiny_net.select("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[9:]")
    assert tiny_net.select("5").id == 5


def test_corrupt_and_mismatched_checkpoints(tiny_net: snnet.StitchedNet, tmp_path) -> None:
    tiny_net.save_pretrained(tmp_path / "good")
    # corrupt weights
    bad = tmp_path / "bad"
    tiny_net.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(bad)
    # corrupt config
    (bad / "config.json").write_text("{not json")
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(bad)
    # weights of another family
    other = snnet.create_snnet(TINY_VITS[:2])
    with pytest.raises(snnet.CheckpointError, match="does not match"):
        other.load_weights(snnet.load(tmp_path / "good").state_dict(), "good")
    # config edited to another space
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    cfg["space"]["stride"] = 2
    (tmp_path / "good" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(snnet.CheckpointError, match="different stitch space"):
        snnet.load(tmp_path / "good")
    with pytest.raises(snnet.CheckpointError, match="not a saved stitched network"):
        snnet.load(tmp_path / "nothing")


def test_custom_parts_are_accepted(images: torch.Tensor) -> None:
    """A model no adapter knows can still be stitched by splitting it by hand."""
    def make(width: int) -> AnchorParts:
        stem = nn.Sequential(nn.Flatten(2), nn.Linear(32 * 32, width))  # (B, 3, W): 3 "tokens"
        blocks = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(3)]
        head = nn.Sequential(nn.Flatten(1), nn.Linear(3 * width, 10))
        return AnchorParts(stem, blocks, head, layout="tokens", data_config={"input_size": (3, 32, 32)})

    net = snnet.create_snnet([make(8), make(16)])
    assert len(net.space) == 2 + 7
    net.select(5)
    assert net(images).shape == (6, 10)
