"""snnet convert: an SN-Net saved by the authors' code lands on the right modules of snnet's network.

Each test builds a state dict the way the reference code names it (``anchors.<i>.<model keys>``,
Microsoft's Swin layout, ``stitch_layers.<...>.transform``), with distinct random weights in
every anchor and every reference stitching layer, converts it, and checks every network of the
space against a forward written here from the timm models' own modules and the reference's
layer numbering (rebuilt from its definition, not from snnet's code).
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
import timm

import snnet
from snnet.convert import convert_reference
from snnet.errors import CheckpointError

from .conftest import TINY_VITS

SWINS = ["snnet_tiny_swin_t", "snnet_tiny_swin_s", "snnet_tiny_swin_b"]
RESNETS = ["snnet_tiny_resnet18", "snnet_tiny_resnet50"]


def models(names: list[str]) -> list[torch.nn.Module]:
    torch.manual_seed(1)
    out = []
    for name in names:
        m = timm.create_model(name).eval()
        with torch.no_grad():  # distinct, non-trivial values everywhere (BN statistics included)
            for k, t in m.state_dict().items():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else t + 0.05 * torch.randn_like(t))
        out.append(m)
    return out


def interp(front: int, end: int) -> list[int]:
    """The reference's block map: torch's nearest interpolation of ``front`` blocks onto ``end``."""
    return F.interpolate(torch.arange(front, dtype=torch.float)[None, None], end)[0, 0].long().tolist()


def reference_layer(i: int, j: int, na: int, nb: int, forward: bool) -> int:
    """The reference's layer index of stitch (i, j) in a stage (window 2, stride 1)."""
    if na == nb:
        if forward:  # only (k, k+1) pairs, one window each
            return i
        return min(i, j) if i != j else max(i - 1, 0)  # a pair first appears in window min(i, j)
    return interp(na, nb)[j - 1]


def add_layers(state: dict, prefix: str, count: int, shape: tuple[int, ...], g: torch.Generator) -> None:
    for layer in range(count):
        state[f"{prefix}{layer}.transform.weight"] = torch.randn(*shape, generator=g) * 0.1
        state[f"{prefix}{layer}.transform.bias"] = torch.randn(shape[0], generator=g) * 0.1


def with_prefix(ms: list[torch.nn.Module], rename=lambda k: k) -> dict[str, torch.Tensor]:
    return {f"anchors.{i}.{rename(k)}": v.clone() for i, m in enumerate(ms) for k, v in m.state_dict().items()}


def stage_of(stages: tuple[int, ...], end: int) -> int:
    return next(s for s in range(len(stages)) if sum(stages[:s]) < end <= sum(stages[:s + 1]))


def check_every_network(net: snnet.StitchedNet, ms: list[torch.nn.Module], route, x: torch.Tensor) -> int:
    net.eval()
    checked = 0
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            want = ms[s.src](x) if s.is_anchor else route(s)
            torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5, msg=s.name)
            checked += 1
    return checked


# ------------------------------------------------------------------ plain ViTs (stitching_deit)


def deit_reference():
    ms = models(TINY_VITS)
    state = with_prefix(ms)
    g = torch.Generator().manual_seed(2)
    dims = [m.embed_dim for m in ms]
    for pair, (a, b) in enumerate([(0, 1), (1, 2)]):  # nearest stitching: Ti->S, S->B
        add_layers(state, f"stitch_layers.{pair}.", 3, (dims[b], dims[a]), g)  # depth 4: 3 windows with new pairs
    return ms, state


def vit_route(ms, state):
    def route(s):
        a, b = ms[s.src], ms[s.dst]
        i, j = s.src_end - 1, s.dst_start
        layer = f"stitch_layers.{s.src}.{reference_layer(i, j, 4, 4, forward=False)}.transform."
        h = a.norm_pre(a.patch_drop(a._pos_embed(a.patch_embed(X))))
        for blk in a.blocks[:i + 1]:
            h = blk(h)
        h = F.linear(h, state[layer + "weight"], state[layer + "bias"])
        for blk in b.blocks[j:]:
            h = blk(h)
        return b.forward_head(b.norm(h))  # snnet runs the target's final norm (the reference does not)
    return route


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_deit_layout_lands_on_the_right_modules():
    ms, state = deit_reference()
    net = snnet.create_snnet(TINY_VITS)
    report = convert_reference(net, state, TINY_VITS)
    assert (report.layout, report.reference_layers, report.snnet_layers) == ("deit", 6, 6)
    assert check_every_network(net, ms, vit_route(ms, state), X) == len(net.space) == 23
    assert report.notes and "LayerNorm" in report.notes[0]


def test_unplaceable_keys_are_refused_by_name():
    ms, state = deit_reference()
    extra = dict(state, **{"anchors.1.mystery.weight": torch.zeros(2), "stitch_layers.0.7.transform.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"anchor 1 .*unexpected anchors\.1\.mystery\.weight"):
        convert_reference(snnet.create_snnet(TINY_VITS), extra, TINY_VITS)
    extra = dict(state, **{"stitch_layers.0.7.transform.weight": torch.zeros(2), "teacher.fc.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"cannot place 2 key.*stitch_layers\.0\.7\.transform\.weight.*teacher\.fc"):
        convert_reference(snnet.create_snnet(TINY_VITS), extra, TINY_VITS)
    missing = {k: v for k, v in state.items() if k != "anchors.2.blocks.3.mlp.fc1.weight"}
    with pytest.raises(CheckpointError, match=r"missing anchors\.2\.blocks\.3\.mlp\.fc1\.weight"):
        convert_reference(snnet.create_snnet(TINY_VITS), missing, TINY_VITS)
    no_layer = {k: v for k, v in state.items() if not k.startswith("stitch_layers.1.2.")}
    with pytest.raises(CheckpointError, match=r"no stitch_layers\.1\.2\.transform\.weight"):
        convert_reference(snnet.create_snnet(TINY_VITS), no_layer, TINY_VITS)


# ------------------------------------------------------------------ Swin (stitching_swin)


def microsoft_key(k: str) -> str:
    """timm's Swin key -> Microsoft's (patch merging at the end of the previous stage; plain head)."""
    k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
    return k.replace("head.fc.", "head.")


def test_swin_layout_lands_on_the_right_modules():
    ms = models(SWINS)
    state = with_prefix(ms, microsoft_key)
    state["anchors.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    g = torch.Generator().manual_seed(4)
    depths = [m.layers[2].depth for m in ms]  # stage 2: 2, 6, 6
    dims = [[m.layers[s].blocks[0].dim for s in range(4)] for m in ms]
    for stage in range(3):
        for pair in range(2):
            na, nb = ms[pair].layers[stage].depth, ms[pair + 1].layers[stage].depth
            count = na if na != nb else na - 1  # unpaired: one per front block; forward paired: one per window
            add_layers(state, f"stitch_layers.{stage}.{pair}.", count, (dims[pair + 1][stage], dims[pair][stage]), g)

    def route(s):
        a, b = ms[s.src], ms[s.dst]
        stages = [len(a.layers[t].blocks) for t in range(4)]
        st = stage_of(tuple(stages), s.src_end)
        i, j = s.src_end - sum(stages[:st]) - 1, s.dst_start - sum(len(b.layers[t].blocks) for t in range(st))
        na, nb = len(a.layers[st].blocks), len(b.layers[st].blocks)
        layer = f"stitch_layers.{st}.{s.src}.{reference_layer(i, j, na, nb, forward=True)}.transform."
        h = a.patch_embed(X)
        for t in range(st):
            h = a.layers[t](h)
        h = a.layers[st].downsample(h)
        for blk in a.layers[st].blocks[:i + 1]:
            h = blk(h)
        h = F.linear(h, state[layer + "weight"], state[layer + "bias"])
        for blk in b.layers[st].blocks[j:]:
            h = blk(h)
        for t in range(st + 1, 4):
            h = b.layers[t](h)
        return b.forward_head(b.norm(h))

    net = snnet.create_snnet(SWINS)
    report = convert_reference(net, state, SWINS)
    assert report.layout == "swin" and report.skipped == ("anchors.0.layers.0.blocks.0.attn.relative_position_index",)
    assert depths == [2, 6, 6] and report.snnet_layers == len(net.stitch_layers) == 1 + 1 + 5 + 1 + 1 + 5
    assert check_every_network(net, ms, route, X) == len(net.space) == 3 + 2 + 2 + 5 + 5  # stages 0, 1, 2


# ------------------------------------------------------------------ ResNet (stitching_resnet_swin)


def test_resnet_layout_lands_on_the_right_modules():
    ms = models(RESNETS)
    state = with_prefix(ms)
    state["anchors.0.bn1.aux_bn.0.weight"] = torch.ones(8)  # a split-BN copy, used only in training
    g = torch.Generator().manual_seed(5)
    units = [[*m.layer1, *m.layer2, *m.layer3, *m.layer4] for m in ms]
    depths = [[len(m.layer1), len(m.layer2), len(m.layer3), len(m.layer4)] for m in ms]
    # channels out of a stage: its last block's last norm (bn2 in a BasicBlock, bn3 in a Bottleneck)
    widths = [[getattr(blk, "bn3", blk.bn2).num_features for blk in (m.layer1[-1], m.layer2[-1], m.layer3[-1], m.layer4[-1])]
              for m in ms]
    for stage in (1, 2):
        add_layers(state, f"stitch_layers.{stage - 1}.0.", depths[0][stage],
                   (widths[1][stage], widths[0][stage], 1, 1), g)

    def route(s):
        a, b = ms[s.src], ms[s.dst]
        st = stage_of(tuple(depths[0]), s.src_end)
        i, j = s.src_end - sum(depths[0][:st]) - 1, s.dst_start - sum(depths[1][:st])
        layer = f"stitch_layers.{st - 1}.0.{reference_layer(i, j, depths[0][st], depths[1][st], forward=True)}.transform."
        h = a.maxpool(a.act1(a.bn1(a.conv1(X))))
        for u in units[s.src][:s.src_end]:
            h = u(h)
        h = F.conv2d(h, state[layer + "weight"], state[layer + "bias"])
        for u in units[s.dst][s.dst_start:]:
            h = u(h)
        return b.forward_head(h)

    net = snnet.create_snnet(RESNETS)
    report = convert_reference(net, state, RESNETS)
    assert report.layout == "resnet_swin" and report.skipped == ("anchors.0.bn1.aux_bn.0.weight",)
    # 2 -> 3 blocks: the reference builds 2 layers but numbers both of its stitches with layer 0
    assert "stitch_layers.0.0.1.transform.bias" in report.notes[0]
    # stage 1: 2 -> 3 blocks, stage 2: 2 -> 4 blocks; the reference keeps 2 layers per stage, snnet one per stitch
    assert (report.reference_layers, report.snnet_layers) == (3, 2 + 3)
    assert check_every_network(net, ms, route, X) == len(net.space) == 2 + 2 + 3


# ------------------------------------------------------------------ the command


def test_cli_converts_a_reference_file(tmp_path, capsys):
    from snnet.cli import main

    ms, state = deit_reference()
    ckpt = tmp_path / "snnet_deit.pth"
    torch.save({"model": state, "epoch": 49, "args": argparse.Namespace(lr=5e-5, model="snnet")}, ckpt)
    out = tmp_path / "converted"
    main(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--out", str(out)])
    assert "6 reference stitching layers" in capsys.readouterr().out
    net = snnet.load(out)
    assert check_every_network(net, ms, vit_route(ms, state), X) == 23
    with pytest.raises(SystemExit) as e:  # a second conversion into the same folder is refused
        main(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--out", str(out)])
    assert e.value.code == 2 and "already holds" in capsys.readouterr().err
