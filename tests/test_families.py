"""Families of models: every adapter on timm's real architectures, the paper's spaces, refusals.

Real timm architectures (random weights) are split by the adapters: at a small image size
where a forward is needed (anchors must equal timm's output), on the meta device where only
shapes and FLOPs are (the paper's stitch counts and fvcore FLOPs, which snnet must reproduce).
Tiny random-init stand-ins registered in snnet/tiny.py exercise training, least squares and
save/load on the hierarchical kinds in milliseconds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import snnet
from snnet.adapters import FAMILIES, family
from snnet.anchors import ActivationSpec, split_model
from snnet.errors import NotStitchableError, UnknownModelError
from snnet.flops import count_macs, num_params, unfused_attention
from snnet.space import AnchorInfo, SpaceConfig, StitchSpace, forward_unpaired_pairs
from snnet.stitching import StitchingLayer

TINY_MODELS = ["snnet_tiny_swin_t", "snnet_tiny_swin_s", "snnet_tiny_swin_b", "snnet_tiny_resnet18",
               "snnet_tiny_resnet50", "snnet_tiny_convnext_t", "snnet_tiny_convnext_s"]
TINY_FAMILIES = {
    "swin": ["snnet_tiny_swin_t", "snnet_tiny_swin_s", "snnet_tiny_swin_b"],
    "resnet": ["snnet_tiny_resnet18", "snnet_tiny_resnet50"],
    "resnet18-swin_t": ["snnet_tiny_resnet18", "snnet_tiny_swin_t"],
    "convnext": ["snnet_tiny_convnext_t", "snnet_tiny_convnext_s"],
}


@pytest.fixture(scope="module")
def nets() -> dict[str, snnet.StitchedNet]:
    torch.manual_seed(0)
    return {k: snnet.create_snnet(v).eval() for k, v in TINY_FAMILIES.items()}


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ adapters


@pytest.mark.parametrize("name", TINY_MODELS)
def test_parts_reproduce_the_model(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    parts = split_model(model)
    assert parts.kind in name and len(parts.stages) == 4 and parts.depth == sum(parts.stages)
    # every parameter sits in exactly one part (no weight lost, none counted twice)
    assert num_params(parts.stem) + sum(num_params(b) for b in parts.blocks) + num_params(parts.head) == num_params(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(parts(x), model(x), atol=1e-6, rtol=0)
    # inside a stage every activation has one resolution; it halves from stage to stage
    specs, _ = parts.probe((3, 32, 32))
    for s, blocks in enumerate(parts.stage_ranges()):
        assert {specs[k + 1].spatial for k in blocks} == {(8 >> s, 8 >> s)}


# ------------------------------------------------------------------ enumeration


def _hier_specs(depths: tuple[int, ...], widths: tuple[int, ...], layout: str, grid: int = 56) -> tuple[ActivationSpec, ...]:
    """Specs of a 4-stage model whose stage s runs at grid/2^s with widths[s] channels:
    input of every unit (the first unit of a stage downsamples), then the last output."""
    stage_of = [s for s, n in enumerate(depths) for _ in range(n)]
    out = [ActivationSpec(layout, widths[0], (grid, grid))]  # stem output
    out += [ActivationSpec(layout, widths[s], (grid >> s, grid >> s)) for s in stage_of]
    return tuple(out)


def _info(label: str, depths, widths, layout: str, stitch_stages, rule: str = "forward") -> AnchorInfo:
    return AnchorInfo(label, tuple(depths), tuple(stitch_stages), _hier_specs(tuple(depths), tuple(widths), layout), rule)


SWIN = dict(layout="nhwc", stitch_stages=(0, 1, 2))
RESNET = dict(layout="nchw", stitch_stages=(1, 2))


def test_paper_counts_from_stage_shapes() -> None:
    swin = StitchSpace([_info("swin_t", (2, 2, 6, 2), (96, 192, 384, 768), **SWIN),
                        _info("swin_s", (2, 2, 18, 2), (96, 192, 384, 768), **SWIN),
                        _info("swin_b", (2, 2, 18, 2), (128, 256, 512, 1024), **SWIN)])
    resnet = StitchSpace([_info("resnet18", (2, 2, 2, 2), (64, 128, 256, 512), **RESNET),
                          _info("resnet50", (3, 4, 6, 3), (256, 512, 1024, 2048), **RESNET)])
    cross = StitchSpace([_info("resnet18", (2, 2, 2, 2), (64, 128, 256, 512), **RESNET),
                         _info("swin_t", (2, 2, 6, 2), (96, 192, 384, 768), **SWIN)])
    assert (len(swin), len(resnet), len(cross)) == (41, 10, 8)  # the official SN-Net code's spaces
    # the paper's rule, stage by stage: both kinds' stages give (deeper depth - 1) stitches each
    assert len(resnet) - 2 == (4 - 1) + (6 - 1)
    assert len(swin) - 3 == 2 * (2 - 1) * 2 + (18 - 1) + (18 - 1)
    # the window rule of the DeiT code, forced on the same anchors, gives a different space
    assert len(StitchSpace(swin.anchors, SpaceConfig(rule="window"))) != 41
    # users can restrict the stages
    assert len(StitchSpace(resnet.anchors, SpaceConfig(stages=(2,)))) == 2 + (6 - 1)


def test_forward_unpaired_rule() -> None:
    # ResNet-18 → ResNet-50, stage 2 (depth 2 → 6): target block k resumes after source block k*2//6
    assert [g[0] for g in forward_unpaired_pairs(2, 6)] == [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    # Swin-T → Swin-S, stage 2: 17 stitches, one layer each, always moving forward in the target
    pairs = forward_unpaired_pairs(6, 18)
    assert len(pairs) == 17 and all(len(g) == 1 for g in pairs)
    # a deeper source: the same relation transposed, kept where the target resumes inside the stage
    assert [g[0] for g in forward_unpaired_pairs(6, 2)] == [(0, 1), (1, 1)]


@pytest.mark.parametrize("fam", list(TINY_FAMILIES))
def test_tiny_enumeration_by_rule(nets, fam: str) -> None:
    net = nets[fam]
    assert [s.name for s in net.space.anchor_stitches()] == list(net.labels)
    expected = len(net.anchors)
    for a in range(len(net.anchors) - 1):
        A, B = net.anchors[a], net.anchors[a + 1]
        stages = [s for s in A.stitch_stages if s in B.stitch_stages]
        expected += sum(max(A.stages[s], B.stages[s]) - 1 for s in stages)
        for s in net.space:
            if s.src != a or s.is_anchor:
                continue
            # every cut lies inside one stitched stage, the target resuming past that stage's downsampling
            st = next(k for k in stages if sum(A.stages[:k]) < s.src_end <= sum(A.stages[:k + 1]))
            assert sum(B.stages[:st]) < s.dst_start < sum(B.stages[:st + 1])
    assert len(net.space) == expected
    assert len(net.space) == {"swin": 17, "resnet": 7, "resnet18-swin_t": 4, "convnext": 6}[fam]


# ------------------------------------------------------------------ every stitch runs


@pytest.mark.parametrize("fam", list(TINY_FAMILIES))
def test_every_stitch_shapes(nets, calib, fam: str) -> None:
    net = nets[fam]
    x = calib[:2]
    acts = [net.activations(k, x) for k in range(len(net.anchors))]
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            assert net(x).shape == (2, net.num_classes), s.name
            if not s.is_anchor:
                mapped = net.stitch_layers[s.layer](acts[s.src][s.src_end])
                assert mapped.shape == acts[s.dst][s.dst_start].shape, s.name


def test_cnn_into_swin_layer_is_conv_then_nhwc(nets) -> None:
    net = nets["resnet18-swin_t"]
    assert [p.kind for p in net.anchors] == ["resnet", "swin"]  # the CNN is the cheaper anchor
    layer = net.stitch_layers[0]
    assert isinstance(layer.proj, torch.nn.Conv2d) and layer.proj.kernel_size == (1, 1)
    h = torch.randn(2, layer.proj.in_channels, 4, 4)
    out = layer(h)
    expected = torch.nn.functional.conv2d(h, layer.proj.weight, layer.proj.bias).permute(0, 2, 3, 1)
    assert torch.allclose(out, expected, atol=1e-6)


# ------------------------------------------------------------------ least squares


@pytest.mark.parametrize("fam", list(TINY_FAMILIES))
def test_least_squares_beats_random_layer(nets, calib, fam: str) -> None:
    net = nets[fam]
    rep = net.init_stitching([calib], max_images=8)
    assert rep.images == 8 and rep.layers == len(net.stitch_layers)
    acts = [net.activations(k, calib) for k in range(len(net.anchors))]
    torch.manual_seed(0)
    with torch.no_grad():
        for s in net.space:
            if s.is_anchor:
                continue
            src, target = acts[s.src][s.src_end], acts[s.dst][s.dst_start]
            slot = net.space.layers[s.layer]
            fitted = torch.mean((net.stitch_layers[s.layer](src) - target) ** 2)
            random = torch.mean((StitchingLayer(slot.src_spec, slot.dst_spec)(src) - target) ** 2)
            assert fitted < random, f"{s.name}: least squares {fitted:.4g} vs random {random:.4g}"


# ------------------------------------------------------------------ FLOPs and params


@pytest.mark.parametrize("fam", list(TINY_FAMILIES))
def test_costs_are_sums_of_counted_routes(nets, fam: str) -> None:
    net = nets[fam]
    costs = net.costs()
    x = torch.zeros(1, *net.input_size)
    for s, c in zip(net.space, costs):
        net.select(s)
        with unfused_attention(net), torch.no_grad():
            flops, _ = count_macs(net, x)
        assert c.flops == flops, s.name
        used = [net.anchors[s.src]] if s.is_anchor else [net.anchors[s.src], net.anchors[s.dst]]
        if s.is_anchor:
            assert c.params == num_params(net.anchors[s.src])
        else:
            assert c.params < sum(num_params(a) for a in used) + num_params(net.stitch_layers[s.layer])


# ------------------------------------------------------------------ refused pairs


def test_no_matching_stage_is_refused_with_shapes() -> None:
    torch.manual_seed(0)
    cnn = timm.create_model("snnet_tiny_resnet18")
    swin = timm.create_model("snnet_tiny_swin_t", patch_size=2)  # stages at 16, 8, 4, 2: no match
    with pytest.raises(NotStitchableError) as e:
        snnet.create_snnet([cnn, swin], labels=["cnn", "swin"])
    msg = str(e.value)
    assert "'cnn'" in msg and "'swin'" in msg and "cannot be stitched" in msg and "stage 1" in msg
    assert "nchw[4x4, C=8]" in msg and "nhwc[8x8, C=16]" in msg


def test_different_patch_sizes_are_refused_with_token_counts() -> None:
    a = timm.create_model("snnet_tiny_vit_ti")
    b = timm.create_model("snnet_tiny_vit_s", patch_size=4)
    with pytest.raises(NotStitchableError, match=r"token counts differ \(tokens\[17, C=16\] vs tokens\[65, C=32\]\)"):
        snnet.create_snnet([a, b], labels=["p8", "p4"])


# ------------------------------------------------------------------ names and save/load


def test_named_families_are_pinned_timm_models() -> None:
    assert set(FAMILIES) >= {"deit", "swin", "resnet", "resnet18-swin_t", "convnext"}
    for key, names in FAMILIES.items():
        if key == "fmnist":  # shipped inside snnet, not pinned to a hub tag
            continue
        for n in names:
            arch, tag = n.split(".")
            assert timm.is_model(arch) and n in timm.list_pretrained(arch + ".*"), n
    for name in set(FAMILIES) - {"fmnist", "resnet18-swin_t"}:  # one training recipe per family of one kind
        assert len({n.split(".")[1] for n in FAMILIES[name]}) == 1, name
    assert family("ResNet18_Swin-T") == FAMILIES["resnet18-swin_t"] and family("vit") is None


def test_save_load_cnn_to_transformer(nets, calib, tmp_path) -> None:
    net = nets["resnet18-swin_t"]
    net.init_stitching([calib])
    s = net.select(len(net.space) - 1)
    net.save_pretrained(tmp_path)
    back = snnet.load(tmp_path).eval()
    assert back.active.name == s.name and [x.name for x in back.space] == [x.name for x in net.space]
    with torch.no_grad():
        assert torch.equal(back(calib[:2]), net(calib[:2]))


def test_cnn_to_swin_trains_and_evaluates(tmp_path) -> None:
    """The same train/evaluate functions as for DeiT, on the CNN → transformer family."""
    from torch.utils.data import TensorDataset

    from snnet.evaluate import evaluate
    from snnet.config import TrainConfig
    from snnet.train import train

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_FAMILIES["resnet18-swin_t"])
    before = [p.detach().clone() for p in net.stitch_layers.parameters()]
    cfg = TrainConfig().override(max_steps=3, batch_size=8, init_images=8, out_dir=str(tmp_path), progress=False,
                                 tensorboard=False, log_every=1, amp="off")
    train(net, data, cfg)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.stitch_layers.parameters()))
    results = evaluate(net, torch.utils.data.DataLoader(data, batch_size=8), progress=False)
    assert [r.name for r in results] == [s.name for s in net.space]
    assert all(0.0 <= r.acc1 <= 100.0 for r in results)
    assert (tmp_path / "final" / "config.json").is_file()


# ------------------------------------------------------------------ real timm architectures

# The smallest timm model of every class an adapter knows, and an image size at which it runs
# in well under a second on one core (at least one token or pixel per stage).
REAL_MODELS = {
    "deit_tiny_patch16_224": (32, "vit"),
    "deit_tiny_distilled_patch16_224": (32, "vit"),
    "swin_tiny_patch4_window7_224": (64, "swin"),
    "swinv2_tiny_window8_256": (64, "swinv2"),
    "swinv2_cr_tiny_224": (64, "swinv2_cr"),
    "resnet18": (64, "resnet"),
    "convnext_atto": (64, "convnext"),
    "levit_128s": (64, "levit"),
    "levit_conv_128s": (64, "levit"),
    "eva02_tiny_patch14_224": (28, "eva"),
    "regnetx_002": (64, "regnet"),
    "efficientnet_b0": (64, "efficientnet"),
    "mobilenetv3_small_100": (64, "mobilenetv3"),
}


def _real(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return timm.create_model(name, img_size=size).eval()
    except TypeError:  # CNNs take any size and have no img_size argument
        return timm.create_model(name).eval()


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_anchor_equals_timm(name: str) -> None:
    size, kind = REAL_MODELS[name]
    model = _real(name, size)
    parts = split_model(model)
    assert parts.kind == kind
    assert num_params(parts.stem) + sum(num_params(b) for b in parts.blocks) + num_params(parts.head) == num_params(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(parts(x), model(x))  # timm's own code on the same modules: bit for bit
    specs, _ = parts.probe((3, size, size))
    if len(parts.stages) > 1:
        # one resolution per stage, halving from stage to stage: 1/4 of the input in stage 0
        # (LeViT's convolutional stem reduces by 16)
        first = 16 if kind == "levit" else 4
        for s, blocks in enumerate(parts.stage_ranges()):
            side = -(-size // (first << s))  # strided layers round up
            assert {specs[k + 1].positions for k in blocks} == {side * side}, s


def test_distilled_deit_averages_both_heads() -> None:
    """The distillation token is in the stem and the head averages the class and distillation heads, as timm does."""
    model = _real("deit_tiny_distilled_patch16_224", 32)
    parts = split_model(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = parts.run(parts.stem(x))
        assert tokens.shape[1] == 2 + 4 and parts.prefix_tokens == 2  # class + distillation + 2x2 patches
        h = model.norm(tokens)
        assert torch.equal(parts.head(tokens), (model.head(h[:, 0]) + model.head_dist(h[:, 1])) / 2)


def test_eva_blocks_get_the_models_rope() -> None:
    model = _real("eva02_tiny_patch14_224", 28)
    parts = split_model(model)
    assert all(b.rope is model.rope for b in parts.blocks)  # shared, not copied
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        h = parts.stem(x)
        with_rope = parts.blocks[0](h)
        without = parts.blocks[0].block(h)  # the same block without the rotary embedding
    assert not torch.allclose(with_rope, without)


class _ViTWithOwnFeatures(VisionTransformer):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # what the ViT adapter would not reproduce
        raise AssertionError("never run: the adapter must refuse before probing")


def test_subclass_is_refused_before_probing() -> None:
    odd = _ViTWithOwnFeatures(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(NotStitchableError, match=r"_ViTWithOwnFeatures subclasses timm's VisionTransformer and "
                                                 r"redefines forward_features; snnet's vit adapter"):
        snnet.create_snnet([odd, timm.create_model("snnet_tiny_vit_s")])


# ------------------------------------------------------------------ the paper's spaces on real models

REFERENCE = json.loads((Path(__file__).parent / "data" / "sn_net_reference_flops.json").read_text())["flops"]


@functools.lru_cache(maxsize=None)
def _meta_family(fam: str) -> snnet.StitchedNet:
    """A named family split from the real timm models on the meta device (no weights), built once."""
    return snnet.create_snnet(fam, device="meta")


@pytest.mark.parametrize("fam", ["swin", "resnet", "resnet18-swin_t", "deit", "levit"])
def test_paper_family_flops_equal_the_reference(fam: str) -> None:
    """Every network's FLOPs, split from the real timm models on the meta device, against the
    official code's results files (fvcore at 224)."""
    net = _meta_family(fam)
    costs = net.costs()
    assert len(net.space) == {"swin": 41, "resnet": 10, "resnet18-swin_t": 8, "deit": 71, "levit": 8}[fam]
    flops = [c.flops for c in costs]
    if fam == "deit":
        # The official DeiT code runs a stitch's head without the target's final LayerNorm
        # (stitching_deit/snnet.py calls forward_head, not forward_norm_head), so each of its
        # stitches counts fvcore's 5 FLOPs x 197 tokens x the target's width less than snnet,
        # whose stitches end in the target's own head, norm included.
        flops = [c.flops - (0 if s.is_anchor else 5 * 197 * net.space.layers[s.layer].dst_spec.channels)
                 for s, c in zip(net.space, costs)]
        assert len(net.stitch_layers) == 22
    assert sorted(flops) == REFERENCE[fam]


def test_paper_anchor_flops() -> None:
    """The anchors' FLOPs as the reference lists them (fvcore: adaptive average pools counted)."""
    swin, resnet = _meta_family("swin").costs(), _meta_family("resnet").costs()
    assert (swin[0].flops, swin[2].flops) == (4_509_194_496, 15_467_826_176)
    assert (resnet[0].flops, resnet[1].flops) == (1_819_065_856, 4_111_512_576)


# Every named family on the meta device: its count follows the paper's rules, worked by hand.
#   ViT-like, 12 blocks, window rule: 34 stitches per neighbouring pair.
#   hierarchical, forward rule: per stitched stage, (deeper depth - 1) stitches.
NAMED_COUNTS = {
    "deit": 3 + 2 * 34,
    "deit-distilled": 3 + 2 * 34,
    "eva02": 2 + 34,
    "swin": 3 + 2 * (1 + 1 + 17),  # depths (2, 2, 6|18, 2); stages 0-2
    "swinv2": 3 + 2 * (1 + 1 + 17),
    "convnext": 3 + 2 * (2 + 2 + 26),  # depths (3, 3, 9|27, 3); stages 0-2
    "resnet": 2 + (4 - 1) + (6 - 1),  # depths (2, 2, 2, 2) and (3, 4, 6, 3); stages 1-2
    "resnet18-swin_t": 2 + (2 - 1) + (6 - 1),
    "levit": 2 + 3 + 3,  # depths (4, 4, 4); stages 0-1
    "regnety": 3 + (2 + 7) + (5 + 16),  # stage depths 1-2: (3, 6), (3, 8), (6, 17)
    "mobilenetv3": 2 + 2 + 5,  # stage depths 1-2: small (2, 5), large (3, 6)
}


@pytest.mark.parametrize("fam", list(NAMED_COUNTS))
def test_named_family_counts(fam: str) -> None:
    net = _meta_family(fam)
    assert len(net.space) == NAMED_COUNTS[fam]
    assert [s.name for s in net.space.anchor_stitches()] == list(net.labels)


def test_every_named_family_is_counted() -> None:
    assert set(FAMILIES) - {"fmnist", "fmnist-converged"} == set(NAMED_COUNTS)  # the shipped two: tests/test_pretrained.py


# ------------------------------------------------------------------ new kinds stitched end to end

# Two real anchors of each new kind at a small size: every layer's first stitch runs after
# least squares, and a stitch's cost is what counting its running route gives.
SMALL_FAMILIES = {
    "deit-distilled": (["deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224"], 32),
    "levit": (["levit_128s", "levit_128"], 64),
    "eva02": (["eva02_tiny_patch14_336", "eva02_small_patch14_336"], 28),
    "regnet": (["regnetx_002", "regnety_004"], 64),
    "efficientnet": (["efficientnet_b0", "efficientnet_b1"], 64),
    "mobilenetv3": (["mobilenetv3_small_100", "mobilenetv3_large_100"], 64),
    "efficientnet-swin": (["efficientnet_b0", "swin_tiny_patch4_window7_224"], 64),
}


@pytest.mark.parametrize("fam", list(SMALL_FAMILIES))
def test_new_kinds_stitch_end_to_end(fam: str) -> None:
    names, size = SMALL_FAMILIES[fam]
    torch.manual_seed(0)
    net = snnet.create_snnet(names, img_size=size).eval()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    net.init_stitching([x])
    routes = net.space.anchor_stitches() + [net.space.layer_stitches(k)[0] for k in range(len(net.space.layers))]
    costs = net.costs()
    with torch.no_grad():
        for s in routes:
            net.select(s)
            y = net(x)
            assert y.shape == (4, net.num_classes) and torch.isfinite(y).all(), s.name
        for s in routes[len(net.anchors) - 1:len(net.anchors) + 1]:  # the largest anchor and a stitch
            net.select(s)
            with unfused_attention(net):
                assert count_macs(net, x[:1])[0] == costs[s.id].flops, s.name


@pytest.mark.parametrize("fam", ["eva02", "levit"])
def test_new_kinds_save_load_and_export(fam: str, tmp_path) -> None:
    """Parts that run timm's own methods (TimmPart) or carry the rope (RopeBlock) survive
    save/load and a standalone exported stitch rebuilt from its config alone."""
    from snnet import deploy

    names, size = SMALL_FAMILIES[fam]
    torch.manual_seed(0)
    net = snnet.create_snnet(names, img_size=size).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    s = net.select(net.space.layer_stitches(0)[0])
    with torch.no_grad():
        want = net(x)
    net.save_pretrained(tmp_path / "net")
    back = snnet.load(tmp_path / "net").eval()
    deploy.save_stitch(deploy.extract(net, s), tmp_path / "stitch", deploy.stitch_config(net, s))
    alone = deploy.load_stitch(tmp_path / "stitch")
    with torch.no_grad():
        assert back.active.name == s.name and torch.equal(back(x), want)
        assert torch.equal(alone(x), want)


def test_cnn_stages_are_numbered_by_resolution() -> None:
    """EfficientNet's blocks at 1/2 join the stem and its 1/16 stage runs two channel counts,
    so its stage 2 lines up with Swin's: the reference's CNN-into-Swin rule holds for it too."""
    with torch.device("meta"):
        eff = split_model(timm.create_model("efficientnet_b0"))
        swin = split_model(timm.create_model("swin_tiny_patch4_window7_224"))
    e_specs, s_specs = eff.probe((3, 224, 224))[0], swin.probe((3, 224, 224))[0]
    r16 = eff.stage_ranges()[2]
    assert {e_specs[k + 1].spatial for k in r16} == {(14, 14)} == {s_specs[k + 1].spatial for k in swin.stage_ranges()[2]}
    assert [e_specs[k + 1].channels for k in r16] == [80, 80, 80, 112, 112, 112]


# ------------------------------------------------------------------ refusals say why


@pytest.mark.parametrize("names, reason", [
    (["resnet18", "deit_tiny_patch16_224"], "a feature map cannot feed tokens"),
    (["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"], "a feature map cannot feed tokens"),
    (["deit_tiny_distilled_patch16_224", "deit_small_patch16_224"], "2 vs 1 extra tokens"),
])
def test_kinds_that_cannot_feed_each_other_are_refused(names: list[str], reason: str) -> None:
    with pytest.raises(NotStitchableError, match=reason) as e:
        snnet.create_snnet(names, device="meta")
    assert "token counts" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, kwargs, reason", [
    ("eva02_tiny_patch14_224", {"dynamic_img_size": True}, "build it with dynamic_img_size=False"),
    ("vit_small_patch16_rope_mixed_224", {}, r"learns its rotary embedding \(rope_mixed\)"),
    ("efficientnet_b0", {"output_stride": 16}, "default output_stride"),
    ("mixer_s16_224", {}, "no adapter knows how to split MlpMixer models"),
])
def test_unsupported_builds_are_refused(name: str, kwargs: dict, reason: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    with pytest.raises(NotStitchableError, match=reason):
        split_model(model)


@pytest.mark.parametrize("typo, first", [
    ("deit_tiny_distiled_patch16_224", "deit_tiny_distilled_patch16_224"),
    ("levit192", "levit_192"),
    ("eva02_tinny_patch14_224", "eva02_tiny_patch14_224"),
    ("resnet_18", "resnet18"),
])
def test_unknown_names_suggest_the_same_family_first(typo: str, first: str) -> None:
    with pytest.raises(UnknownModelError, match=rf"Did you mean: {first}, ") as e:
        snnet.create_snnet([typo, "resnet50"], device="meta")
    fam = first[:3]
    assert all(n.strip().startswith(fam) for n in str(e.value).split("Did you mean:")[1].rstrip("?").split(","))

# ------------------------------------------------------------------ params, counted by hand


def _n(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _swin_route_params(a, b, st: int, i: int, j: int) -> int:
    """Source through block i of stage st, a Linear, target from block j of stage st: timm's Swin modules."""
    src = _n(a.patch_embed, *a.layers[:st], a.layers[st].downsample, *a.layers[st].blocks[:i + 1])
    c_in, c_out = a.layers[st].blocks[0].dim, b.layers[st].blocks[0].dim
    return src + c_in * c_out + c_out + _n(*b.layers[st].blocks[j:], *b.layers[st + 1:], b.norm, b.head)


def _resnet_units(m) -> list[torch.nn.Module]:
    return [*m.layer1, *m.layer2, *m.layer3, *m.layer4]


@pytest.mark.parametrize("fam", ["swin", "resnet", "resnet18-swin_t"])
def test_stitched_params_match_a_count_of_the_route_modules(nets, fam: str) -> None:
    net = nets[fam]
    models = {n: timm.create_model(n) for n in TINY_FAMILIES[fam]}  # same architectures, own modules
    ms = [models[next(n for n in models if n.startswith(label))] for label in net.labels]
    costs = net.costs()
    for s in net.space:
        if s.is_anchor:
            assert costs[s.id].params == _n(ms[s.src]), s.name
            continue
        a, b = ms[s.src], ms[s.dst]
        A, B = net.anchors[s.src].stages, net.anchors[s.dst].stages
        st = next(k for k in range(4) if sum(A[:k]) < s.src_end <= sum(A[:k + 1]))
        i, j = s.src_end - sum(A[:st]) - 1, s.dst_start - sum(B[:st])
        if fam == "swin":
            want = _swin_route_params(a, b, st, i, j)
        else:  # a ResNet source: stem, its units, a 1x1 conv, then the target's units and head
            src = _n(a.conv1, a.bn1, *_resnet_units(a)[:s.src_end])
            c_in = getattr(_resnet_units(a)[s.src_end - 1], "bn3", _resnet_units(a)[s.src_end - 1].bn2).num_features
            if fam == "resnet":  # the target resumes inside a stage: its input has the previous unit's channels
                prev = _resnet_units(b)[s.dst_start - 1]
                c_out = getattr(prev, "bn3", prev.bn2).num_features
                dst = _n(*_resnet_units(b)[s.dst_start:], b.fc)
            else:  # into Swin: the target's blocks j.. of the stage, later stages, norm, head
                c_out = b.layers[st].blocks[0].dim
                dst = _n(*b.layers[st].blocks[j:], *b.layers[st + 1:], b.norm, b.head)
            want = src + c_in * c_out + c_out + dst
        assert costs[s.id].params == want, s.name
