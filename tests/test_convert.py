"""snnet convert: an SN-Net saved by the authors' code runs, in snnet, exactly the networks the reference runs.

Each test builds a state dict the way the reference code names it (``anchors.<i>.<model keys>`` in
the reference's own layout: Microsoft's Swin, Facebook's LeViT, DeiT III's ``gamma_1``;
``stitch_layers.<...>.transform`` numbered as the reference numbers them), with distinct random
weights in every anchor and every reference stitching layer, and converts it. Then, for every
network the reference lists — enumerated here as the reference's code enumerates them, its
``cfg_id`` being the position in that list — the converted network selected by
:func:`snnet.reference.reference_ids` must give the logits of a forward written here from the
reference's definition of that route (its ``forward_until`` / ``forward_from`` /
``selective_forward``, its head, its layer numbering), on the timm models' own modules, within
1e-5. Read at the commits of :data:`snnet.reference.SOURCES`.
"""

from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import snnet
from snnet.convert import convert_reference
from snnet.errors import CheckpointError
from snnet.reference import net_reference_ids

from .conftest import TINY_VITS

SWINS = ["snnet_tiny_swin_t", "snnet_tiny_swin_s", "snnet_tiny_swin_b"]
RESNETS = ["snnet_tiny_resnet18", "snnet_tiny_resnet50"]
RESNET_SWIN = ["snnet_tiny_resnet18", "snnet_tiny_swin_s"]
LEVITS = ["snnet_tiny_levit_a", "snnet_tiny_levit_b"]
DEIT3S = ["snnet_tiny_deit3_s", "snnet_tiny_deit3_l"]
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def models(names: list[str]) -> list[torch.nn.Module]:
    torch.manual_seed(1)
    out = []
    for name in names:
        m = timm.create_model(name).eval()
        with torch.no_grad():  # distinct, non-trivial values everywhere (BN statistics, layer scales included)
            for k, t in m.state_dict().items():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else t + 0.05 * torch.randn_like(t))
        out.append(m)
    return out


def with_prefix(ms: list[torch.nn.Module], rename=lambda k: k) -> dict[str, torch.Tensor]:
    return {f"anchors.{i}.{rename(k)}": v.clone() for i, m in enumerate(ms) for k, v in m.state_dict().items()}


def add_layers(state: dict, prefix: str, count: int, shape: tuple[int, ...], g: torch.Generator, rank: int = 0) -> None:
    for layer in range(count):
        state[f"{prefix}{layer}.transform.weight"] = torch.randn(*shape, generator=g) * 0.1
        state[f"{prefix}{layer}.transform.bias"] = torch.randn(shape[0], generator=g) * 0.1
        if rank:
            state[f"{prefix}{layer}.transform.lora_A"] = torch.randn(rank, shape[1], generator=g) * 0.1
            state[f"{prefix}{layer}.transform.lora_B"] = torch.randn(shape[0], rank, generator=g) * 0.1


# ------------------------------------------------------------------ the reference's enumerations


def interp(front: int, end: int) -> list[int]:
    """The reference's block map: torch's nearest interpolation of ``front`` blocks onto ``end``."""
    return F.interpolate(torch.arange(front, dtype=torch.float)[None, None], end)[0, 0].long().tolist()


def paired(depth: int, forward: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """``paired_stitching`` (window 2, stride 1): (source block, target block) and layer per stitch;
    the hierarchical folders keep only the pairs whose target comes after the source."""
    cfgs, layers, layer = [], [], -1
    for i in range(depth):
        ids = range(i, min(i + 2, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in cfgs and (not forward or j < k)]
        layer += bool(new)
        cfgs += new
        layers += [layer] * len(new)
    return cfgs, layers


def unpaired(front: int, end: int) -> tuple[list[tuple[int, int]], list[int]]:
    """``unpaired_stitching``: (block, i) for every target block i > 0 mapped to it; its caller zips the
    stitches with the block map, so stitch n gets layer ``map[n]``. It builds ``front`` layers."""
    mapping = interp(front, end)
    cfgs = [(idx, i) for idx in range(front) for i, e in enumerate(mapping) if e == idx and idx < i]
    return cfgs, mapping[:len(cfgs)]


def deit_configs(depth: int) -> list[dict]:
    """``stitching_deit/utils.get_stitch_configs`` with nearest stitching (three anchors)."""
    cfgs, layers = paired(depth, forward=False)
    out = []
    for comb in [(0,), (1,), (2,), (0, 1), (1, 2)]:
        out += [dict(comb=comb)] if len(comb) == 1 else [dict(comb=comb, cfg=c, layer=n) for c, n in zip(cfgs, layers)]
    return out


def hierarchical_configs(stage_depths: list[list[int]], stages: tuple[int, ...]) -> list[dict]:
    """``SNNet.__init__`` of stitching_swin / stitching_resnet_swin / stitching_levit: the anchors, then
    stage by stage, each neighbouring pair (``j`` its index in the stage's list of pairs)."""
    out = [dict(comb=(a,)) for a in range(len(stage_depths))]
    for s in stages:
        for j in range(len(stage_depths) - 1):
            na, nb = stage_depths[j][s], stage_depths[j + 1][s]
            cfgs, layers = paired(na, forward=True) if na == nb else unpaired(na, nb)
            out += [dict(comb=(j, j + 1), stage=s, pair=j, cfg=c, layer=n) for c, n in zip(cfgs, layers)]
    return out


def layer_count(na: int, nb: int) -> int:
    """Layers the hierarchical code builds for one pair in one stage."""
    return max(paired(na, forward=True)[1]) + 1 if na == nb else na


def check_every_reference_network(net: snnet.StitchedNet, configs: list[dict], forward, x: torch.Tensor,
                                  unused: tuple[int, ...] = ()) -> int:
    """Every reference network (by cfg_id) against the converted network's, within 1e-5."""
    ids = {r: s for s, r in net_reference_ids(net).items()}
    assert sorted(ids) == [r for r in range(len(configs)) if r not in unused]
    assert sorted(ids.values()) == list(range(len(net.space)))  # and nothing else in snnet's space
    net.eval()
    with torch.no_grad():
        for r, cfg in enumerate(configs):
            if r in unused:
                continue
            net.select(ids[r])
            torch.testing.assert_close(net(x), forward(cfg, x), rtol=0, atol=1e-5, msg=f"cfg_id {r} ({net.active.name})")
    return len(ids)


# ------------------------------------------------------------------ plain ViTs (stitching_deit)


def deit_reference():
    ms = models(TINY_VITS)
    state = with_prefix(ms)
    g = torch.Generator().manual_seed(2)
    dims = [m.embed_dim for m in ms]
    for pair, (a, b) in enumerate([(0, 1), (1, 2)]):  # nearest stitching: Ti->S, S->B
        add_layers(state, f"stitch_layers.{pair}.", 3, (dims[b], dims[a]), g)  # depth 4: 3 windows with new pairs
    return ms, state


def deit_forward(ms, state):
    """``stitching_deit/snnet.SNNet.forward``: an anchor alone runs whole; a stitched route runs the
    source's patch embedding and blocks up to cfg[0], the layer, the target's blocks from cfg[1] and
    ``forward_head`` — without the target's final norm."""
    def forward(c, x):
        if len(c["comb"]) == 1:
            return ms[c["comb"][0]](x)
        a, b = (ms[k] for k in c["comb"])
        (j, k), key = c["cfg"], f"stitch_layers.{c['comb'][0]}.{c['layer']}.transform."
        h = a._pos_embed(a.patch_embed(x))
        for blk in a.blocks[:j + 1]:
            h = blk(h)
        h = F.linear(h, state[key + "weight"], state[key + "bias"])
        for blk in b.blocks[k:]:
            h = blk(h)
        return b.forward_head(h)
    return forward


def test_deit_checkpoint_runs_the_reference_networks():
    ms, state = deit_reference()
    net = snnet.create_snnet(TINY_VITS, route_mode="reference")
    report = convert_reference(net, state, TINY_VITS)
    assert (report.layout, report.reference_layers, report.snnet_layers, report.notes) == ("deit", 6, 6, ())
    assert check_every_reference_network(net, deit_configs(4), deit_forward(ms, state), X) == len(net.space) == 23


def test_deit_in_snnet_route_mode_keeps_the_final_norm_and_says_so():
    ms, state = deit_reference()
    net = snnet.create_snnet(TINY_VITS)
    report = convert_reference(net, state, TINY_VITS)
    assert "route_mode='reference'" in report.notes[0]
    net.eval().select(5)
    with torch.no_grad():  # a stitched route differs from the reference's (the norm), the anchors do not
        assert (net(X) - deit_forward(ms, state)(deit_configs(4)[5], X)).abs().max() > 1e-3
        net.select(1)
        torch.testing.assert_close(net(X), ms[1](X), rtol=0, atol=1e-5)


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


def swin_until(a, x, stage: int, blk: int):
    """Microsoft's ``forward_until``: patch embedding, whole layers (blocks, then their patch merging), then
    the blocks of ``stage`` through ``blk``. Microsoft's layer ``t`` merges patches at its end, which is
    timm's ``layers[t + 1].downsample``."""
    h = a.patch_embed(x)
    for t in range(stage):
        h = a.layers[t + 1].downsample(a.layers[t].blocks(h))
    for b in a.layers[stage].blocks[:blk + 1]:
        h = b(h)
    return h


def swin_from(b, h, stage: int, blk: int):
    """Microsoft's ``forward_from``: the blocks of ``stage`` from ``blk``, its patch merging, the later
    layers, then the final norm, the average over positions and the classifier."""
    for t in range(stage, 4):
        if t > stage:
            h = b.layers[t].blocks(h)
        else:
            for blk_ in b.layers[t].blocks[blk:]:
                h = blk_(h)
        if t < 3:
            h = b.layers[t + 1].downsample(h)
    return b.head.fc(b.norm(h).mean(dim=(1, 2)))


def staged_forward(ms, state, until, from_, layer_key, layer_op):
    """The hierarchical folders' ``SNNet.forward``: anchor alone, or ``forward_until``, the layer, ``forward_from``."""
    def forward(c, x):
        if len(c["comb"]) == 1:
            return ms[c["comb"][0]](x)
        a, b = (ms[k] for k in c["comb"])
        key = layer_key(c)
        h = until(a, x, c["stage"], c["cfg"][0])
        h = layer_op(h, state[key + "weight"], state[key + "bias"])
        return from_(b, h, c["stage"], c["cfg"][1])
    return forward


def test_swin_checkpoint_runs_the_reference_networks():
    ms = models(SWINS)
    state = with_prefix(ms, microsoft_key)
    state["anchors.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    g = torch.Generator().manual_seed(4)
    depths = [[len(m.layers[s].blocks) for s in range(4)] for m in ms]
    dims = [[m.layers[s].blocks[0].dim for s in range(4)] for m in ms]
    for stage in range(3):
        for pair in range(2):
            add_layers(state, f"stitch_layers.{stage}.{pair}.", layer_count(depths[pair][stage], depths[pair + 1][stage]),
                       (dims[pair + 1][stage], dims[pair][stage]), g)
    forward = staged_forward(ms, state, swin_until, swin_from,
                             lambda c: f"stitch_layers.{c['stage']}.{c['pair']}.{c['layer']}.transform.", F.linear)
    net = snnet.create_snnet(SWINS, route_mode="reference")
    report = convert_reference(net, state, SWINS)
    assert report.layout == "swin" and report.skipped == ("anchors.0.layers.0.blocks.0.attn.relative_position_index",)
    assert depths[0][2] == 2 and depths[1][2] == depths[2][2] == 6
    configs = hierarchical_configs(depths, (0, 1, 2))
    assert check_every_reference_network(net, configs, forward, X) == len(net.space) == 3 + 2 + 2 + 5 + 5
    # the reference lists stage by stage: its id 4 is S->B in stage 0, which snnet lists after every T->S stitch
    assert net_reference_ids(net)[net.stitch("snnet_tiny_swin_s[:1]+snnet_tiny_swin_b[1:]").id] == 4


def test_a_swin_network_with_backward_stitches_is_refused_in_one_line():
    """A Swin network built with rule='window' has stitches back in depth, which the reference's hierarchical code
    never builds: looking up their reference layer raised a bare StopIteration."""
    state = with_prefix(models(SWINS), microsoft_key)
    net = snnet.create_snnet(SWINS, rule="window", route_mode="reference")
    with pytest.raises(CheckpointError, match=r"stitch snnet_tiny_swin_t\[:1\]\+snnet_tiny_swin_s\[0:\] is not one of the "
                                              r"reference's stitches"):
        convert_reference(net, state, SWINS)


def test_a_deeper_swin_anchor_in_the_checkpoint_is_refused_by_name():
    """Swin anchors given in another order than the checkpoint's: the checkpoint's Swin-S holds blocks Swin-T lacks,
    and timm's filter raised AttributeError ("Sequential has no attribute `2`") looking up their relative-position
    tables; now those keys are named as unexpected, in one line."""
    swapped = [SWINS[1], SWINS[0], SWINS[2]]
    state = with_prefix(models(swapped), microsoft_key)
    with pytest.raises(CheckpointError, match=r"anchor 0 \(snnet_tiny_swin_t\) .*unexpected anchors\.0\.layers\.2\.blocks\.2\."):
        convert_reference(snnet.create_snnet(SWINS, route_mode="reference"), state, SWINS)


# ------------------------------------------------------------------ ResNet and ResNet -> Swin (stitching_resnet_swin)


def resnet_units(m):
    return [list(m.layer1), list(m.layer2), list(m.layer3), list(m.layer4)]


def resnet_until(a, x, stage: int, blk: int):
    """``ResNet.forward_until``: the stem, then every block up to block ``blk`` of ``stage``."""
    h = a.maxpool(a.act1(a.bn1(a.conv1(x))))
    for s, units in enumerate(resnet_units(a)[:stage + 1]):
        for u in units[:blk + 1] if s == stage else units:
            h = u(h)
    return h


def resnet_from(b, h, stage: int, blk: int):
    """``ResNet.forward_from``: the blocks of ``stage`` from ``blk``, the later stages, ``forward_head``."""
    for s, units in enumerate(resnet_units(b)):
        for u in units[blk:] if s == stage else units if s > stage else []:
            h = u(h)
    return b.forward_head(h)


def resnet_reference(names: list[str], g_seed: int):
    ms = models(names)
    state = with_prefix(ms)
    state["anchors.0.bn1.aux_bn.0.weight"] = torch.ones(8)  # a split-BN copy, used only in training
    g = torch.Generator().manual_seed(g_seed)
    a = ms[0]
    b_units = [len(u) for u in resnet_units(ms[1])] if hasattr(ms[1], "layer1") else [len(l.blocks) for l in ms[1].layers]
    a_units = [len(u) for u in resnet_units(a)]
    width_a = [getattr(u[-1], "bn3", u[-1].bn2).num_features for u in resnet_units(a)]
    width_b = ([getattr(u[-1], "bn3", u[-1].bn2).num_features for u in resnet_units(ms[1])] if hasattr(ms[1], "layer1")
               else [l.blocks[0].dim for l in ms[1].layers])
    for stage in (1, 2):
        add_layers(state, f"stitch_layers.{stage - 1}.0.", layer_count(a_units[stage], b_units[stage]),
                   (width_b[stage], width_a[stage], 1, 1), g)
    return ms, state, [a_units, b_units]


def layer_key(c):
    return f"stitch_layers.{c['stage'] - 1}.{c['pair']}.{c['layer']}.transform."


def test_resnet_checkpoint_runs_the_reference_networks():
    ms, state, depths = resnet_reference(RESNETS, 5)
    net = snnet.create_snnet(RESNETS, route_mode="reference")
    report = convert_reference(net, state, RESNETS)
    assert report.layout == "resnet_swin" and report.skipped == ("anchors.0.bn1.aux_bn.0.weight",)
    # 2 -> 3 blocks: the reference builds 2 layers but numbers both of its stitches with layer 0
    assert "stitch_layers.0.0.1.transform.bias" in report.notes[0]
    # stage 1: 2 -> 3 blocks, stage 2: 2 -> 4 blocks; the reference keeps 2 layers per stage, snnet one per stitch
    assert (report.reference_layers, report.snnet_layers) == (3, 2 + 3)
    forward = staged_forward(ms, state, resnet_until, resnet_from, layer_key, F.conv2d)
    assert check_every_reference_network(net, hierarchical_configs(depths, (1, 2)), forward, X) == 2 + 2 + 3


def test_resnet_to_swin_checkpoint_runs_the_reference_networks():
    ms, state, depths = resnet_reference(RESNET_SWIN, 6)
    state = {re.sub(r"^anchors\.1\.(.+)", lambda m: "anchors.1." + microsoft_key(m[1]), k): v for k, v in state.items()}

    def to_swin(h, w, b):
        """The reference's CNN->ViT layer: a 1x1 convolution, then the map as positions (Swin's layout)."""
        return F.conv2d(h, w, b).permute(0, 2, 3, 1)

    forward = staged_forward(ms, state, resnet_until, swin_from, layer_key, to_swin)
    net = snnet.create_snnet(RESNET_SWIN, route_mode="reference")
    report = convert_reference(net, state, RESNET_SWIN)
    assert report.layout == "resnet_swin" and (report.reference_layers, report.snnet_layers) == (1 + 2, 1 + 5)
    assert check_every_reference_network(net, hierarchical_configs(depths, (1, 2)), forward, X) == 2 + 1 + 5


# ------------------------------------------------------------------ LeViT (stitching_levit)


def facebook_levit_state(m) -> dict[str, torch.Tensor]:
    """A timm LeViT's weights under Facebook's LeViT names (the reference's levit.py): one flat
    ``blocks`` sequence — per stage, an attention and an MLP residual per block, then an attention
    subsample and an MLP residual — ``Linear_BN``'s ``c``/``bn``, ``BN_Linear``'s ``bn``/``l``,
    ``b16``'s convolutions at 0, 2, 4, 6, and each attention's bias index table as a buffer."""
    out, n = {}, 0

    def put(prefix: str, module, renames) -> None:
        for k, v in module.state_dict().items():
            for old, new in renames:
                k = re.sub(old, new, k)
            out[prefix + k] = v.clone()
        if hasattr(module, "attention_bias_idxs"):
            out[prefix + "attention_bias_idxs"] = module.attention_bias_idxs.clone()

    linear_bn = [(r"\.linear\.", ".c.")]
    for s, stage in enumerate(m.stages):
        if s:
            put(f"blocks.{n}.", stage.downsample.attn_downsample, [(r"^(q|proj)\.ln\.", r"\1.1."), *linear_bn, (r"^kv\.linear", "kv.c")])
            put(f"blocks.{n + 1}.m.", stage.downsample.mlp, [(r"^ln1\.", "0."), (r"^ln2\.", "2."), (r"\.linear\.", ".c.")])
            n += 2
        for blk in stage.blocks:
            put(f"blocks.{n}.m.", blk.attn, [(r"^proj\.ln\.", "proj.1."), (r"^qkv\.linear", "qkv.c"), *linear_bn])
            put(f"blocks.{n + 1}.m.", blk.mlp, [(r"^ln1\.", "0."), (r"^ln2\.", "2."), (r"\.linear\.", ".c.")])
            n += 2
    for i in range(4):
        put(f"patch_embed.{2 * i}.", getattr(m.stem, f"conv{i + 1}"), [(r"^linear\.", "c.")])
    for head in ("head", "head_dist"):
        put(f"{head}.", getattr(m, head), [(r"^linear\.", "l.")])
    return out


def levit_flat(m) -> list:
    """The modules of Facebook's flat ``blocks`` sequence, from timm's LeViT (a residual adds its input)."""
    flat = []
    for s, stage in enumerate(m.stages):
        if s:
            flat += [stage.downsample.attn_downsample, lambda h, f=stage.downsample.mlp: h + f(h)]
        for blk in stage.blocks:
            flat += [lambda h, f=blk.attn: h + f(h), lambda h, f=blk.mlp: h + f(h)]
    return flat


def levit_until(a, x, stage: int, blk: int):
    """Facebook LeViT's ``forward_until``: the stem as tokens, then ``blocks[:stage * 10 + (blk + 1) * 2]``."""
    h = a.stem(x).flatten(2).transpose(1, 2)
    for f in levit_flat(a)[:stage * 10 + (blk + 1) * 2]:
        h = f(h)
    return h


def levit_from(b, h, stage: int, blk: int):
    """``forward_from``: ``blocks[stage * 10 + blk * 2:]``, the mean over tokens, the two heads averaged."""
    for f in levit_flat(b)[stage * 10 + blk * 2:]:
        h = f(h)
    h = h.mean(1)
    return (b.head(h) + b.head_dist(h)) / 2


def test_levit_checkpoint_runs_the_reference_networks():
    ms = models(LEVITS)
    state = {f"anchors.{i}.{k}": v for i, m in enumerate(ms) for k, v in facebook_levit_state(m).items()}
    assert "anchors.0.blocks.9.m.2.c.weight" in state and "anchors.1.blocks.18.q.1.bn.running_var" in state
    g = torch.Generator().manual_seed(7)
    dims = [m.embed_dim for m in ms]
    for stage in (0, 1):
        add_layers(state, f"stitch_layers.{stage}.0.", 3, (dims[1][stage], dims[0][stage]), g)
    forward = staged_forward(ms, state, levit_until, levit_from,
                             lambda c: f"stitch_layers.{c['stage']}.0.{c['layer']}.transform.", F.linear)
    net = snnet.create_snnet(LEVITS, route_mode="reference")
    report = convert_reference(net, state, LEVITS)
    assert report.layout == "levit" and all(k.endswith("attention_bias_idxs") for k in report.skipped)
    assert (report.reference_layers, report.snnet_layers, report.notes) == (6, 6, ())
    depths = [[4, 4, 4], [4, 4, 4]]
    assert check_every_reference_network(net, hierarchical_configs(depths, (0, 1)), forward, X64) == len(net.space) == 8


def test_levit_keys_that_fit_nowhere_are_named_as_the_checkpoint_names_them():
    ms = models(LEVITS)
    state = {f"anchors.{i}.{k}": v for i, m in enumerate(ms) for k, v in facebook_levit_state(m).items()}
    del state["anchors.1.blocks.3.m.0.bn.running_mean"]
    net = snnet.create_snnet(LEVITS, route_mode="reference")
    with pytest.raises(CheckpointError, match=r"anchor 1 .*missing anchors\.1\.blocks\.3\.m\.0\.bn\.running_mean"):
        convert_reference(net, state, LEVITS)


# ------------------------------------------------------------------ SN-Netv2 (ziplab/SN-Netv2 classification)


def v2_configs(d: int, D: int) -> list[dict]:
    """``get_stitch_configs_bidirection``: the anchors, small->large at every block of the small anchor,
    large->small at every other block of the large one, then L->S->L and S->L->S."""
    r, mapping = D // d, interp(d, D)
    sl = [dict(comb=[0, 1], cfgs=[[i, (i + 1) * r]], layers=[i]) for i in range(d)]
    ls = [dict(comb=[1, 0], cfgs=[[i, mapping[i] + 1]], layers=[i // r]) for i in range(D)
          if (i % 2 == 1 if D != d else True) and i < D - 1]
    lsl = [dict(comb=[1, 0, 1], cfgs=[a["cfgs"][0], b["cfgs"][0]], layers=a["layers"] + b["layers"])
           for a in ls for b in sl if b["layers"][0] != d - 1 and b["cfgs"][0][0] >= a["cfgs"][0][1]]
    sls = [dict(comb=[0, 1, 0], cfgs=[a["cfgs"][0], b["cfgs"][0]], layers=a["layers"] + b["layers"])
           for a in sl for b in ls if b["cfgs"][0][0] >= a["cfgs"][0][1]]
    return [dict(comb=[0]), dict(comb=[1])] + sl + ls + lsl + sls


def v2_forward(ms, state, rank: int):
    """``SNNetv2.forward``: the first anchor's patch embedding; per segment, its blocks ``begin..end``
    (inclusive, ``selective_forward``) and the layer of that anchor's bank (none after the last);
    then the last anchor's ``forward_norm_head``. A layer is the low-rank Linear of the reference,
    unmerged: ``x W^T + b + (x A^T B^T) / rank``."""
    depths = [len(m.blocks) for m in ms]

    def layer(h, bank, n):
        key = f"stitch_layers.{bank}.{n}.transform."
        low = (h @ state[key + "lora_A"].t() @ state[key + "lora_B"].t()) / rank
        return F.linear(h, state[key + "weight"], state[key + "bias"]) + low

    def forward(c, x):
        comb = c["comb"]
        if len(comb) == 1:
            return ms[comb[0]](x)
        cuts = c["cfgs"]
        route = [[0, cuts[0][0]]] + [[cuts[i][1], cuts[i + 1][0]] for i in range(len(cuts) - 1)] + [[cuts[-1][1], depths[comb[-1]]]]
        h = ms[comb[0]]._pos_embed(ms[comb[0]].patch_embed(x))
        for i, (k, (begin, end)) in enumerate(zip(comb, route)):
            for blk in ms[k].blocks[begin:end + 1]:
                h = blk(h)
            if i < len(comb) - 1:
                h = layer(h, k, c["layers"][i])
        last = ms[comb[-1]]
        return last.head(last.norm(h)[:, 0])
    return forward


def deit3_reference(rank: int = 2):
    ms = models(DEIT3S)
    state = with_prefix(ms, lambda k: re.sub(r"ls([12])\.gamma", r"gamma_\1", k))
    assert "anchors.1.blocks.7.gamma_2" in state
    g = torch.Generator().manual_seed(8)
    (ds, dl), (ws, wl) = [len(m.blocks) for m in ms], [m.embed_dim for m in ms]
    add_layers(state, "stitch_layers.0.", ds, (wl, ws), g, rank)  # small -> large, one after every small block
    add_layers(state, "stitch_layers.1.", ds - 1, (ws, wl), g, rank)  # large -> small
    return ms, state


def test_snnetv2_checkpoint_runs_the_reference_networks():
    ms, state = deit3_reference()
    net = snnet.create_snnet(DEIT3S, two_way=True, lora_rank=2, route_mode="reference")
    report = convert_reference(net, state, DEIT3S)
    assert report.layout == "snnetv2" and (report.reference_layers, report.snnet_layers) == (6, 6)
    # the small->large layer after the small anchor's last block: built, never run
    assert report.notes == ("1 reference stitching layer(s) that no network of the reference runs were left out "
                            "(stitch_layers.0.3.transform.bias, stitch_layers.0.3.transform.lora_A, "
                            "stitch_layers.0.3.transform.lora_B, stitch_layers.0.3.transform.weight)",)
    configs = v2_configs(4, 8)
    assert len(configs) == 15 and configs[5]["cfgs"] == [[3, 8]]  # cfg_id 5: the unused small->large stitch
    assert check_every_reference_network(net, configs, v2_forward(ms, state, 2), X, unused=(5,)) == len(net.space) == 14


def test_snnetv2_low_rank_layers_must_match_the_network():
    ms, state = deit3_reference()
    with pytest.raises(CheckpointError, match=r"low-rank .*build the network with lora_rank=2"):
        convert_reference(snnet.create_snnet(DEIT3S, two_way=True), state, DEIT3S)


# ------------------------------------------------------------------ the command


def _run(args, capsys):
    from snnet.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_cli_converts_a_reference_file_into_the_reference_networks(tmp_path, capsys):
    from snnet.cli import main

    ms, state = deit_reference()
    ckpt = tmp_path / "snnet_deit.pth"
    torch.save({"model": state, "epoch": 49, "args": argparse.Namespace(lr=5e-5, model="snnet")}, ckpt)
    out = tmp_path / "converted"
    main(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--out", str(out)])
    assert "6 reference stitching layers" in capsys.readouterr().out
    net = snnet.load(out)
    assert net.route_mode == "reference"
    assert check_every_reference_network(net, deit_configs(4), deit_forward(ms, state), X) == 23
    code, io = _run(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--out", str(out)], capsys)
    assert code == 2 and "already holds" in io.err  # a second conversion into the same folder is refused
    (out / "config.json").unlink()  # the weights alone (a save cut before its config): replaced without a word before
    weights = (out / "model.safetensors").read_bytes()
    code, io = _run(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--out", str(out)], capsys)
    assert code == 2 and "already holds a saved network (model.safetensors)" in io.err
    assert (out / "model.safetensors").read_bytes() == weights


def test_cli_converts_an_snnetv2_file(tmp_path, capsys):
    from snnet.cli import main

    ms, state = deit3_reference(rank=2)
    ckpt = tmp_path / "snnetv2.pth"
    torch.save({"model": state}, ckpt)
    main(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(DEIT3S), "--out", str(tmp_path / "v2")])
    assert "(snnetv2 layout)" in capsys.readouterr().out
    net = snnet.load(tmp_path / "v2")
    assert net.space.config.two_way and net.lora_rank == 2
    assert check_every_reference_network(net, v2_configs(4, 8), v2_forward(ms, state, 2), X, unused=(5,)) == 14


def test_cli_refuses_snnet_files_and_bad_out_in_one_line(tmp_path, capsys):
    net = snnet.create_snnet(TINY_VITS)
    saved = net.save_pretrained(tmp_path / "net")
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")  # as snnet train saves one
    anchors = ["--anchors", ",".join(TINY_VITS)]
    for given, said in ((saved, "saved by snnet"), (tmp_path / "checkpoint.pt", "saved by snnet"),
                        (saved / "model.safetensors", "safetensors")):
        code, io = _run(["convert", "--from-reference", str(given), *anchors, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and said in io.err and len(io.err.strip().splitlines()) == 1, io.err
    (tmp_path / "a-file").write_text("x")
    # --out is checked first: the checkpoint named here does not even exist
    code, io = _run(["convert", "--from-reference", str(tmp_path / "none.pth"), *anchors, "--out",
                     str(tmp_path / "a-file")], capsys)
    assert code == 2 and "is a file" in io.err and len(io.err.strip().splitlines()) == 1


def test_a_checkpoint_of_more_anchors_than_given_is_refused_as_such(tmp_path, capsys):
    """A three-anchor DeiT checkpoint given two anchors: its second bank of layers (stitch_layers.1) made the command
    build SN-Netv2's two-way space, and the refusal was a layer's shape ("stitch_layers.1.0.transform.weight has
    shape (64, 32); snnet layer 3 needs (16, 32)"), which says nothing of the anchor left out."""
    ms, state = deit_reference()
    ckpt = tmp_path / "snnet_deit.pth"
    torch.save({"model": state}, ckpt)
    code, io = _run(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS[:2]), "--out",
                     str(tmp_path / "o")], capsys)
    assert code == 2 and "holds 3 anchors (anchors.0 to anchors.2) but 2 were given" in io.err, io.err
    assert len(io.err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_anchors_of_the_wrong_size_are_refused_in_one_line(tmp_path, capsys):
    """Anchors given in another order than the checkpoint's (or of another size): each wrong shape named, one
    line; load_state_dict raised its multi-line RuntimeError (a traceback from the command line)."""
    ms, state = deit_reference()
    swapped = [TINY_VITS[1], TINY_VITS[0], TINY_VITS[2]]
    with pytest.raises(CheckpointError, match=r"anchor 0 .*wrong shape anchors\.0\.cls_token \(1, 1, 16\) \(needs \(1, 1, 32\)\)"):
        convert_reference(snnet.create_snnet(swapped, route_mode="reference"), state, swapped)
    ckpt = tmp_path / "snnet_deit.pth"
    torch.save({"model": state}, ckpt)
    code, io = _run(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(swapped), "--out",
                     str(tmp_path / "o")], capsys)
    assert code == 2 and "wrong shape" in io.err and len(io.err.strip().splitlines()) == 1, io.err


def test_an_anchor_timm_would_resample_is_refused():
    """An SN-Netv2 (DeiT III) checkpoint converted into anchors of another image size: timm's filter resampled the
    position embedding to fit and the conversion went through silently, into a network the authors never ran
    (the same mistake with DeiT anchors, which need no filter, was refused)."""
    ms, state = deit3_reference()
    net = snnet.create_snnet(DEIT3S, two_way=True, lora_rank=2, route_mode="reference", img_size=64)
    with pytest.raises(CheckpointError, match=r"anchors\.0 is not this model: timm would resample "
                                              r"anchors\.0\.pos_embed \(1, 16, 16\) -> \(1, 64, 16\)"):
        convert_reference(net, state, DEIT3S)


def test_an_all_pairs_deit_checkpoint_runs_the_reference_three_anchor_networks_too(tmp_path, capsys):
    """``nearest_stitching=False``: the reference lists Ti->B and the Ti->S->B routes (its second stitch leaving S at
    or after the block the first entered it), through the layers of their pairs. Converting into a network with
    chains raised StopIteration (the three-anchor routes were looked up as pairs), and ``--all-pairs`` built none
    of the 63 three-anchor networks."""
    from snnet.cli import main

    ms = models(TINY_VITS)
    state = with_prefix(ms)
    g = torch.Generator().manual_seed(2)
    dims = [m.embed_dim for m in ms]
    combos = [(0, 1), (0, 2), (1, 2)]
    for pair, (a, b) in enumerate(combos):
        add_layers(state, f"stitch_layers.{pair}.", 3, (dims[b], dims[a]), g)
    cfgs, layers = paired(4, forward=False)
    configs = [dict(comb=(a,)) for a in range(3)]
    for comb in combos:
        configs += [dict(comb=comb, cfgs=[c], layers=[n]) for c, n in zip(cfgs, layers)]
    configs += [dict(comb=(0, 1, 2), cfgs=[c1, c2], layers=[n1, n2]) for c1, n1 in zip(cfgs, layers)
                for c2, n2 in zip(cfgs, layers) if c2[0] >= c1[1]]

    def forward(c, x):  # stitching_deit's SNNet.forward
        if len(c["comb"]) == 1:
            return ms[c["comb"][0]](x)
        h, start = ms[c["comb"][0]]._pos_embed(ms[c["comb"][0]].patch_embed(x)), 0
        for i, ((j, k), n) in enumerate(zip(c["cfgs"], c["layers"])):
            for blk in ms[c["comb"][i]].blocks[start:j + 1]:
                h = blk(h)
            key = f"stitch_layers.{combos.index(c['comb'][i:i + 2])}.{n}.transform."
            h, start = F.linear(h, state[key + "weight"], state[key + "bias"]), k
        for blk in ms[c["comb"][-1]].blocks[start:]:
            h = blk(h)
        return ms[c["comb"][-1]].forward_head(h)

    net = snnet.create_snnet(TINY_VITS, nearest=False, chains=True, route_mode="reference")
    convert_reference(net, state, TINY_VITS)
    assert check_every_reference_network(net, configs, forward, X) == len(configs) == 96
    ckpt = tmp_path / "snnet_deit_all.pth"
    torch.save({"model": state}, ckpt)
    main(["convert", "--from-reference", str(ckpt), "--anchors", ",".join(TINY_VITS), "--all-pairs", "--out",
          str(tmp_path / "o")])
    assert check_every_reference_network(snnet.load(tmp_path / "o"), configs, forward, X) == 96
