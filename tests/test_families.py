"""Hierarchical and convolutional families (Swin, ResNet, ConvNeXt, CNN → transformer).

Tiny random-init stand-ins registered in snnet/tiny.py exercise the real name-based paths;
the paper's counts for the real families are checked on the stitch space alone, from the
shapes their stages have at 224x224 (building Swin-B just to count would take seconds).
"""

from __future__ import annotations

import pytest
import timm
import torch

import snnet
from snnet.adapters import FAMILIES, family
from snnet.anchors import ActivationSpec, split_model
from snnet.errors import NotStitchableError
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
    for name in ("deit", "swin", "resnet", "convnext"):  # one training recipe per family
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
    from snnet.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_FAMILIES["resnet18-swin_t"])
    before = [p.detach().clone() for p in net.stitch_layers.parameters()]
    cfg = TrainConfig(max_steps=3, batch_size=8, init_images=8, out_dir=str(tmp_path), progress=False,
                      tensorboard=False, log_every=1, amp="off")
    train(net, data, cfg)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.stitch_layers.parameters()))
    results = evaluate(net, torch.utils.data.DataLoader(data, batch_size=8), progress=False)
    assert [r.name for r in results] == [s.name for s in net.space]
    assert all(0.0 <= r.acc1 <= 100.0 for r in results)
    assert (tmp_path / "final" / "config.json").is_file()


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
