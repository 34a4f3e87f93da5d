"""snnet.stitching: stitching layers, plain and low-rank (SN-Netv2)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import snnet
from snnet.anchors import ActivationSpec
from snnet.stitching import LeastSquares, StitchingLayer

from .conftest import fitted_net, seeded_net


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


def test_low_rank_costs_save_load_and_set_rank(images: torch.Tensor, tmp_path) -> None:
    plain, low = seeded_net(two_way=True), fitted_net(two_way=True, lora_rank=2, lora_alpha=4.0)
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
