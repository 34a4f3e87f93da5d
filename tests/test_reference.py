"""The authors' reference: their ids of snnet's networks, their published results, their evaluation
protocol, and the reference route mode (stitched DeiT routes without the final norm)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import snnet
from snnet.errors import ConfigError, ResultsError
from snnet.evaluate import evaluate
from snnet.reference import (PAPER_EVAL, PUBLISHED, net_reference_ids, paper_data_config, published_rows,
                             read_published, reference_routes)
from snnet.results import load_results, write_results

from .conftest import TINY_VITS, _run

# ------------------------------------------------------------------ the published tables


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_published_row_names_the_same_network_in_snnet(name: str) -> None:
    """The shipped table agrees with the code that made it: the reference's id maps to the row's snnet id
    and name, snnet prices that network as the table says, and the published FLOPs agree with snnet's
    count of it — exactly, for the route as the reference runs it (fvcore's convention both; snnet's own
    DeiT routes add the final LayerNorm)."""
    data = read_published(name)
    table = PUBLISHED[name]
    net = snnet.create_snnet(list(table.anchors), device="meta", two_way=table.two_way)
    ids = net_reference_ids(net)
    by_ref = {r: s for s, r in ids.items()}
    costs = net.costs()
    as_theirs = snnet.create_snnet(list(table.anchors), device="meta", two_way=table.two_way,
                                   route_mode="reference").costs()
    assert data["source"]["commit"] and data["license"].startswith("Apache-2.0") and data["images"] == 50_000
    assert len(data["rows"]) == len(net.space) == data["networks"]
    for row in data["rows"]:
        s = net.space[by_ref[row["ref_id"]]]
        assert (row["id"], row["name"], row["is_anchor"]) == (s.id, s.name, s.is_anchor)
        assert (row["snnet_flops"], row["snnet_params"]) == (costs[s.id].flops, costs[s.id].params)
        assert abs(row["snnet_flops"] / row["flops"] - 1) < 3e-4
        assert as_theirs[s.id].flops == row["flops"]
        assert 0 < row["acc1"] < 100


def test_the_published_tables_number_their_networks_as_the_reference_code() -> None:
    """Swin's code lists stage by stage (20 ids differ from snnet's), SN-Netv2's lists an S->L stitch it
    never runs (id 13; every snnet id after it is one lower); DeiT numbers alike."""
    moved = {name: sum(r["id"] != r["ref_id"] for r in read_published(name)["rows"]) for name in PUBLISHED}
    assert moved == {"deit": 0, "swin": 20, "resnet": 0, "resnet18-swin_t": 0, "levit": 0, "snnetv2-deit3-s-l": 121}
    v2 = read_published("snnetv2-deit3-s-l")["rows"]
    assert 13 not in {r["ref_id"] for r in v2} and all(r["id"] == r["ref_id"] - (r["ref_id"] > 13) for r in v2)
    net = snnet.create_snnet(list(PUBLISHED["snnetv2-deit3-s-l"].anchors), device="meta", two_way=True)
    routes = reference_routes(net.space.anchors, "snnetv2")
    assert len(routes) == 135 and routes[13] is None and sum(r is not None for r in routes) == 134


def test_the_tables_readme_states_each_deit_difference_the_table_holds() -> None:
    """snnet/data_files/reference/README.md said +378,240 FLOPs and +38,016 params "on every stitched network" of
    DeiT; the stitches from DeiT-S into DeiT-B (half of them) differ by +756,480 and +76,032."""
    from snnet.reference import _TABLES

    text = (_TABLES / "README.md").read_text()
    rows = read_published("deit")["rows"]
    for column in ("flops", "params"):
        for diff in sorted({r[f"snnet_{column}"] - r[column] for r in rows} - {0}):
            assert f"+{diff:,}" in text, (column, diff)
    assert "on every stitched network" not in text


def test_published_rows_as_the_network_or_beside_it() -> None:
    rows = published_rows("reference:deit")
    assert [r.kind for r in rows[:4]] == ["anchor", "anchor", "anchor", "stitch"] and len(rows) == 71
    assert rows[0].acc1 == pytest.approx(70.564, abs=1e-3) and math.isnan(rows[0].acc5)
    assert rows[5].value("ref_id") == 5 and rows[5].value("source") == "reference:deit"
    beside = published_rows("swin", kind="reference")
    assert {r.kind for r in beside} == {"reference"} and sum(r.pareto for r in beside) > 1
    assert {r.value("params_from") for r in published_rows("levit")} == {"snnet"}  # LeViT's table has no params
    with pytest.raises(ResultsError, match=r"no reference table 'vgg': snnet ships reference:deit, reference:swin"):
        read_published("reference:vgg")


def test_cli_draws_the_papers_figure_from_the_papers_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "paper"
    code = _run(["eval", "--results", "reference:deit", "--zoo", "timm-in1k", "--zoo-family", "deit", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "71 networks on 50000 images" in printed and "ref id" in printed
    rows = load_results(out)
    assert sum(not r.is_zoo for r in rows) == 71 and {r.value("source") for r in rows if not r.is_zoo} == {"reference:deit"}
    assert all((out / f).stat().st_size > 0 for f in ("pareto.html", "pareto.png"))
    assert "SN-Net as its authors published it (reference:deit" in (out / "pareto.html").read_text()


def test_cli_sets_the_papers_rows_beside_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    run = evaluate(net, batches, progress=False)
    assert [r.value("ref_id") for r in run] == list(range(len(run)))  # the DeiT code numbers alike
    write_results(run, tmp_path / "run")
    out = tmp_path / "beside"
    assert _run(["eval", "--results", str(tmp_path / "run"), "--reference", "deit", "--out", str(out)]) == 0
    assert "71 reference rows from reference:deit" in capsys.readouterr().out
    rows = load_results(out)
    assert sum(r.kind == "reference" for r in rows) == 71 and len([r for r in rows if not r.is_comparison]) == 23
    # twice the same table replaces it; the run's own frontier is the run's
    assert _run(["eval", "--results", str(out), "--reference", "deit", "--out", str(out)]) == 0
    again = load_results(out)
    assert sum(r.kind == "reference" for r in again) == 71
    assert {r.id for r in again if r.pareto and not r.is_comparison} == {r.id for r in run if r.pareto}
    assert "the authors' reference:deit" in (out / "pareto.html").read_text()
    assert _run(["eval", "--results", str(out), "--reference", "vgg", "--out", str(out)]) == 2


# ------------------------------------------------------------------ ids in snnet stitches


def test_stitches_carry_the_reference_id(capsys: pytest.CaptureFixture) -> None:
    from snnet.cli import main

    main(["stitches", "--anchors", "deit", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 71 and [r["ref_id"] for r in rows] == list(range(71))
    main(["stitches", "--anchors", "swin"])
    printed = capsys.readouterr().out
    assert "ref id" in printed and "41 of 41; 20 differ from snnet's" in printed
    main(["stitches", "--anchors", "convnext", "--json"])  # no reference code builds a ConvNeXt SN-Net
    assert {r["ref_id"] for r in json.loads(capsys.readouterr().out)} == {None}


# ------------------------------------------------------------------ evaluation protocol


def test_the_paper_protocol_is_the_reference_folders_transform() -> None:
    deit = snnet.create_snnet("deit", device="meta")
    cfg = paper_data_config({p.kind for p in deit.anchors}, False, deit.anchors[0].data_config)
    assert deit.anchors[0].data_config["crop_pct"] == 0.9  # timm's own for DeiT
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.875, "bicubic")
    v2 = snnet.create_snnet(list(PUBLISHED["snnetv2-deit3-s-l"].anchors), device="meta", two_way=True)
    assert paper_data_config({"vit"}, True, v2.anchors[0].data_config)["crop_pct"] == PAPER_EVAL["snnetv2"]["crop_pct"] == 1.0
    # anchors trained with another normalisation, or a family the paper never trained: no paper protocol
    assert paper_data_config({"vit"}, False, snnet.create_snnet(TINY_VITS).anchors[0].data_config) is None
    assert paper_data_config({"convnext"}, False, deit.anchors[0].data_config) is None


def test_a_results_row_records_the_transform_it_was_evaluated_with(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An ImageFolder evaluation records timm's transform; the paper's transform, described, is 256 -> 224 bicubic."""
    from snnet.data import build_dataset, describe_transform

    root = tmp_path / "data" / "val"
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (40, 48), (20 * c, 100, 30)).save(root / f"c{c}" / "0.png")
    torch.manual_seed(0)
    snnet.create_snnet(TINY_VITS).save_pretrained(tmp_path / "net")
    out = tmp_path / "eval"
    assert _run(["eval", "--model", str(tmp_path / "net"), "--data", str(tmp_path / "data"), "--split", "val",
                 "--no-progress", "--out", str(out)]) == 0
    row = load_results(out)[0]
    assert row.value("eval_protocol") == "timm"  # tiny ViTs normalise with 0.5: not a family the paper trained
    assert row.value("eval_transform") == ("resize shorter side to 32 (bilinear), centre crop 32x32, "
                                           "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)")
    code = _run(["eval", "--model", str(tmp_path / "net"), "--data", str(tmp_path / "data"), "--split", "val",
                 "--eval-protocol", "paper", "--out", str(out)])
    assert code == 2 and "use --eval-protocol timm" in capsys.readouterr().err
    paper = dict(snnet.create_snnet("deit", device="meta").anchors[0].data_config, **PAPER_EVAL["deit"])
    assert describe_transform(build_dataset(tmp_path / "data", "val", paper)) == (
        "resize shorter side to 256 (bicubic), centre crop 224x224, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)")


# ------------------------------------------------------------------ the reference route mode


def test_reference_route_mode_drops_the_final_norm_on_stitched_deit_routes_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = snnet.create_snnet(TINY_VITS).eval()
    theirs = snnet.create_snnet(TINY_VITS, route_mode="reference").eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = ours.costs(), theirs.costs()
    for s in ours.space:
        ours.select(s), theirs.select(s)
        with torch.no_grad():
            same = torch.equal(ours(x), theirs(x))
        assert same == s.is_anchor, s.name
        last = ours.anchors[s.anchors[-1]]
        tokens, width = ours.space.anchors[s.anchors[-1]].specs[-1].spatial[0], last.head.norm.normalized_shape[0]
        # the norm's cost (fvcore: 5 per element) and parameters are what a stitched route no longer pays
        assert a[s.id].flops - b[s.id].flops == (0 if s.is_anchor else 5 * tokens * width)
        assert a[s.id].params - b[s.id].params == (0 if s.is_anchor else 2 * width)
    theirs.save_pretrained(tmp_path / "net")
    cfg = json.loads((tmp_path / "net" / "config.json").read_text())
    assert cfg["version"] == 3 and cfg["route_mode"] == "reference"
    back = snnet.load(tmp_path / "net").eval()
    back.select(5), theirs.select(5)
    with torch.no_grad():
        assert back.route_mode == "reference" and torch.equal(back(x), theirs(x))
    assert json.loads((ours.save_pretrained(tmp_path / "ours") / "config.json").read_text())["version"] == 1


def test_reference_heads_follow_train_and_eval() -> None:
    """A stitched route's reference head is not a submodule; it must still follow net.eval(): a distilled
    DeiT family trained with two heads returned (class, distillation) tuples from stitched routes in eval."""
    import timm

    from snnet.distill import set_two_head_training

    torch.manual_seed(0)
    ms = [timm.create_model(n, img_size=32, depth=2, num_classes=5)
          for n in ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224")]
    net = snnet.create_snnet(ms, img_size=32, route_mode="reference")
    assert set_two_head_training(net) == 2
    x = torch.randn(2, 3, 32, 32)
    for s in net.space:
        net.select(s)
        with torch.no_grad():
            assert isinstance(net.train()(x), tuple), s.name
            out = net.eval()(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 5), s.name


def test_reference_route_mode_is_the_default_elsewhere_and_refused_without_a_reference() -> None:
    torch.manual_seed(0)
    swin = snnet.create_snnet(["snnet_tiny_swin_t", "snnet_tiny_swin_s"], route_mode="reference")
    assert all(swin.head_of(s) is swin.anchors[s.anchors[-1]].head for s in swin.space)  # the Swin code keeps the norm
    with pytest.raises(ConfigError, match="builds no SN-Net of snnet_tiny_convnext_t"):
        snnet.create_snnet(["snnet_tiny_convnext_t", "snnet_tiny_convnext_s"], route_mode="reference")
    with pytest.raises(ConfigError, match="unknown route mode"):
        snnet.create_snnet(TINY_VITS, route_mode="paper")


# ------------------------------------------------------------------ training as the reference trains


def test_levit_heads_are_trained_apart_as_the_reference_does() -> None:
    """stitching_levit's DistillationLoss: the class head on the labels, the distillation head on the teacher."""
    import torch.nn.functional as F

    from snnet.distill import set_two_head_training, two_head_loss

    torch.manual_seed(0)
    net = snnet.create_snnet(["snnet_tiny_levit_a", "snnet_tiny_levit_b"], route_mode="reference").train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    teacher = torch.randn(4, 10)
    net.select(4)  # a stitched route
    assert isinstance(net(x), torch.Tensor)  # timm's default: one averaged output, also in training
    assert set_two_head_training(net) == 2
    cls, dist = net(x)
    set_two_head_training(net, False)
    torch.testing.assert_close(net(x), (cls + dist) / 2)  # what the network gives when not trained two ways
    set_two_head_training(net)
    loss = two_head_loss((cls, dist), y, F.cross_entropy, teacher, "hard", 0.5)
    want = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, teacher.argmax(-1))
    torch.testing.assert_close(loss, want)
    head = net.head_of(net.active)
    for with_teacher, dist_learns in ((None, False), (teacher, True)):
        net.zero_grad()
        two_head_loss(net(x), y, F.cross_entropy, with_teacher).backward()
        assert (head.head_dist.linear.weight.grad is not None) == dist_learns  # labels never reach head_dist
        assert head.head.linear.weight.grad.abs().sum() > 0
    net.eval()
    assert isinstance(net(x), torch.Tensor)  # inference: the average, as always
    with pytest.raises(Exception, match="set_two_head_training"):
        two_head_loss(cls, y, F.cross_entropy, teacher)


def test_split_batch_erasing_leaves_the_first_half_clean() -> None:
    """The reference ResNet loader (--resplit) erases only the second half of every batch."""
    import random

    from snnet.data import erasing_collate, split_batch_erasing

    random.seed(0)
    batch = torch.zeros(8, 3, 16, 16)
    split_batch_erasing(1.0)(batch)
    erased = [bool((img != 0).any()) for img in batch]
    assert erased == [False] * 4 + [True] * 4
    collate = erasing_collate(split_batch_erasing(1.0, splits=1))  # no split: every image, as a per-image transform
    images, labels = collate([(torch.zeros(3, 16, 16), k) for k in range(4)])
    assert all(bool((img != 0).any()) for img in images) and labels.tolist() == [0, 1, 2, 3]
    assert not split_batch_erasing(0.0)(torch.zeros(4, 3, 8, 8)).any()


def test_stale_zero_grads_update_what_the_route_did_not_use_as_the_reference_does() -> None:
    """PyTorch 1.10's zero_grad kept zero gradients: parameters used once keep being decayed and moved on
    their momentum; snnet's steps leave them alone unless asked to step as the reference does."""
    from snnet.reference import stale_zero_grads

    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    x = torch.randn(4, 3, 32, 32)

    def step(stitch: int, reference: bool) -> int:
        opt.zero_grad(set_to_none=True)
        net.select(stitch)
        net(x).sum().backward()
        filled = stale_zero_grads(opt) if reference else 0
        opt.step()
        return filled

    step(0, False)  # the smallest anchor learns once
    layer = net.anchors[0].blocks[0].attn.qkv.weight
    before = layer.detach().clone()
    assert step(2, False) == 0 and torch.equal(layer, before)  # snnet: a route that does not use it leaves it
    filled = step(2, True)  # the reference: decayed and moved on its momentum
    assert filled == sum(1 for p in net.anchors[0].parameters()) and not torch.equal(layer, before)


def test_stale_zero_grads_decay_what_momentum_free_sgd_stepped() -> None:
    """SGD without momentum keeps no state for the parameters it stepped, so stale_zero_grads (which looked at the
    optimizer's state alone) gave them no zero gradient: under optim.unused_updates 'reference' they were not
    decayed, where PyTorch < 2.0's zero_grad kept their zero gradients and the step applied the weight decay."""
    from snnet.reference import stale_zero_grads

    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([used, unused], lr=0.1, momentum=0.0, weight_decay=0.5)
    for params in ([used, unused], [used]):  # both learn once, then a route that leaves `unused` out
        opt.zero_grad(set_to_none=True)
        sum(p.sum() for p in params).backward()
        filled = stale_zero_grads(opt)
        opt.step()
    assert filled == 1
    # after the first step 1 - 0.1 * (1 + 0.5), then decayed alone: times 1 - 0.1 * 0.5
    torch.testing.assert_close(unused.detach(), torch.full((2,), 0.85 * 0.95))
