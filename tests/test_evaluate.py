"""Evaluation with shared prefixes, the Pareto frontier, results files and `snnet eval`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import snnet
from snnet.errors import ResultsError, SnnetError, StitchNotFoundError
from snnet.evaluate import (Row, check_writable, evaluate, format_results, load_results, pareto_front,
                            write_results)

from .conftest import TINY_VITS, _batches, _folder, _naive, _run, fitted_net


@pytest.mark.parametrize("family", [TINY_VITS, ["snnet_tiny_vit_ti", "snnet_tiny_vit_deep"]], ids=["paired", "unpaired"])
def test_shared_prefix_matches_each_stitch_alone(family: list[str]) -> None:
    torch.manual_seed(0)
    net = snnet.create_snnet(family)
    net.init_stitching(_batches(), max_images=24)  # least squares: stitches then differ from each other
    net.eval()
    batches = _batches()
    results = evaluate(net, batches, progress=False)
    assert [r.id for r in results] == [s.id for s in net.space]
    costs = net.costs()
    for r in results:
        acc1, acc5, loss = _naive(net, batches, r.id)
        assert r.acc1 == pytest.approx(acc1, abs=1e-5)
        assert r.acc5 == pytest.approx(acc5, abs=1e-5)
        assert r.loss == pytest.approx(loss, abs=1e-5)
        assert (r.flops, r.params, r.images) == (costs[r.id].flops, costs[r.id].params, 24)
    assert len({round(r.loss, 6) for r in results}) > len(results) // 2  # really different networks


def test_each_prefix_runs_once_per_batch(tiny_net: snnet.StitchedNet) -> None:
    calls = {k: 0 for k in range(len(tiny_net.anchors))}
    block_calls = [0]
    for k, a in enumerate(tiny_net.anchors):
        a.stem.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        for blk in a.blocks:
            blk.register_forward_hook(lambda *_: block_calls.__setitem__(0, block_calls[0] + 1))
    batches = _batches(n=20, batch=10)
    tiny_net.select(5)
    tiny_net.train()
    evaluate(tiny_net, batches, progress=False)
    # every anchor but the last is a source; the last runs only as an anchor: one stem run each, per batch
    assert calls == {k: 2 for k in calls}
    # blocks: every anchor's full depth once, plus each stitch's own suffix, per batch
    suffix = sum(tiny_net.anchors[s.dst].depth - s.dst_start for s in tiny_net.space if not s.is_anchor)
    assert block_calls[0] == 2 * (sum(a.depth for a in tiny_net.anchors) + suffix)
    assert tiny_net.training and tiny_net.active.id == 5  # mode and route left as they were


def test_subset_by_id_and_name(tiny_net: snnet.StitchedNet) -> None:
    name = tiny_net.space[7].name
    results = evaluate(tiny_net, _batches(), [name, 0, "7"], progress=False)
    assert [r.id for r in results] == [0, 7]
    assert sum(r.pareto for r in results) >= 1


def test_bad_stitch_fails_before_any_forward(tiny_net: snnet.StitchedNet) -> None:
    ran = []
    tiny_net.anchors[0].stem.register_forward_hook(lambda *_: ran.append(1))
    with pytest.raises(StitchNotFoundError, match="did you mean|out of range|snnet stitches"):
        evaluate(tiny_net, _batches(), [0, 999], progress=False)
    assert not ran


def test_labels_outside_the_head_are_rejected(tiny_net: snnet.StitchedNet) -> None:
    with pytest.raises(SnnetError, match="classes"):
        evaluate(tiny_net, _batches(classes=20, seed=3), progress=False)


def test_labels_of_any_integer_type_score_as_int64_and_others_are_refused(tiny_net: snnet.StitchedNet) -> None:
    """int32 labels (a dataset built from numpy) ended in cross_entropy's "expected target dtype to be
    Long", float or one-hot labels and a label count other than the batch's in deeper torch errors."""
    batches = _batches()
    expected = [(r.acc1, r.acc5, r.loss) for r in evaluate(tiny_net, batches, [0, 3], progress=False)]
    as_int32 = [(x, y.to(torch.int32)) for x, y in batches]
    assert [(r.acc1, r.acc5, r.loss) for r in evaluate(tiny_net, as_int32, [0, 3], progress=False)] == expected
    x, y = batches[0]
    for bad in (y.float(), y[:, None], y[:-1]):
        with pytest.raises(SnnetError, match="labels must be one class index"):
            evaluate(tiny_net, [(x, bad)], [0], progress=False)


def test_float64_images_are_scored_as_float32_and_integer_images_refused(tiny_net: snnet.StitchedNet) -> None:
    """float64 images (a dataset built from numpy) ended in "Input type (double) and bias type (float)
    should be the same" from the first convolution; uint8 pixels (unnormalised) the same way."""
    batches = _batches()
    expected = [(r.acc1, r.acc5, r.loss) for r in evaluate(tiny_net, batches, [0, 3], progress=False)]
    as_double = [(x.double(), y) for x, y in batches]
    got = [(r.acc1, r.acc5, r.loss) for r in evaluate(tiny_net, as_double, [0, 3], progress=False)]
    assert got == expected  # float32 images made float64 and back: the same numbers
    x, y = batches[0]
    with pytest.raises(SnnetError, match="images must be float tensors.*torch.uint8"):
        evaluate(tiny_net, [((x * 50).clamp(0, 255).to(torch.uint8), y)], [0], progress=False)


def test_images_of_a_size_a_stitch_cannot_take_are_refused_in_one_line(tiny_net: snnet.StitchedNet) -> None:
    """28x28 images for a ViT of 32x32 ended in timm's AssertionError from inside the patch embedding;
    a size every stitch takes (a CNN's) is still evaluated, priced at that size."""
    active, ran = tiny_net.active, []
    tiny_net.anchors[0].stem.register_forward_hook(lambda *_: ran.append(1))
    with pytest.raises(SnnetError, match=r"the loader gives 3x28x28 inputs, which stitch .* cannot take.*own input is 3x32x32"):
        evaluate(tiny_net, _batches(size=28), progress=False)
    assert not ran and tiny_net.active == active and tiny_net.training
    torch.manual_seed(0)
    cnn = snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"])
    results = evaluate(cnn, _batches(n=4, size=48), progress=False)
    assert [r.flops for r in results] == [c.flops for c in cnn.costs((3, 48, 48))]


def test_a_later_batch_of_another_size_is_refused_in_one_line(tiny_net: snnet.StitchedNet) -> None:
    """Only the first batch's size was checked: a later 28x28 batch for a 32x32 ViT ended in timm's
    AssertionError, and on a CNN the rows were priced at the first batch's size only."""
    active = tiny_net.active
    with pytest.raises(SnnetError, match=r"the loader gives 3x28x28 inputs after 3x32x32 ones: every image must have"):
        evaluate(tiny_net, _batches(n=16, size=32) + _batches(n=4, size=28), progress=False)
    assert tiny_net.active == active and tiny_net.training
    torch.manual_seed(0)
    cnn = snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"])
    with pytest.raises(SnnetError, match="3x40x40 inputs after 3x48x48 ones"):
        evaluate(cnn, _batches(n=4, size=48) + _batches(n=4, size=40), progress=False)


def test_top5_with_fewer_than_five_classes() -> None:
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS, num_classes=3)
    results = evaluate(net, _batches(classes=3), progress=False)
    assert all(r.acc5 == 100.0 for r in results)  # top-3 of 3 classes always hits


# ------------------------------------------------------------------ Pareto frontier


def _r(id: int, flops: int, acc1: float, **kw) -> Row:
    return Row(id, f"net{id}", flops, 10 * flops, acc1, min(100.0, acc1 + 20), 1.0, 100, id < 2, **kw)


def test_pareto_front_hand_made() -> None:
    results = [
        _r(0, 5, 10.0),   # cheapest: on
        _r(1, 10, 50.0),  # on
        _r(2, 20, 40.0),  # dearer and worse than 1: off
        _r(3, 20, 60.0),  # on
        _r(4, 20, 60.0),  # exact tie with 3: the lower id is kept
        _r(5, 30, 60.0),  # dearer, only as good as 3: off
        _r(6, 40, 70.0),  # on
        _r(7, 40, 65.0),  # same cost as 6, worse: off
    ]
    expected = {0, 1, 3, 6}
    assert pareto_front(results) == expected
    for seed in range(3):  # order of the input does not matter
        shuffled = results[:]
        random.Random(seed).shuffle(shuffled)
        assert pareto_front(shuffled) == expected
    # another cost axis: latency reverses the order of 0 and 1, so 0 drops off
    timed = [_r(r.id, r.flops, r.acc1, latency_ms=float(r.flops if r.id != 0 else 15)) for r in results]
    assert pareto_front(timed, x="latency_ms") == {1, 3, 6}
    with pytest.raises(ResultsError, match="latency_ms"):
        pareto_front(results, x="latency_ms")


# ------------------------------------------------------------------ files


def test_results_json_schema_and_round_trips(tmp_path: Path, tiny_net: snnet.StitchedNet) -> None:
    results = evaluate(tiny_net, _batches(), progress=False)
    results[3] = Row(**{**results[3].__dict__, "latency_ms": 1.25, "extra": {"device": "cpu", "batch": 8}})
    json_path, csv_path = write_results(results, tmp_path / "out")
    rows = json.loads(json_path.read_text())
    assert isinstance(rows, list) and len(rows) == len(tiny_net.space)
    for row in rows:
        assert {"id", "name", "flops", "params", "acc1", "acc5", "loss", "images", "is_anchor", "pareto"} <= set(row)
        assert type(row["flops"]) is int and type(row["params"]) is int
        assert isinstance(row["is_anchor"], bool) and isinstance(row["pareto"], bool)
    assert rows[3]["latency_ms"] == 1.25 and rows[3]["device"] == "cpu" and "latency_ms" not in rows[0]
    assert load_results(json_path) == results
    assert load_results(tmp_path / "out") == results  # the folder works too
    back = load_results(csv_path)
    assert [r.to_dict() for r in back][0] == results[0].to_dict()
    assert back[3].latency_ms == 1.25 and back[3].extra["device"] == "cpu"
    assert [(r.id, r.flops, r.acc1, r.loss, r.is_anchor, r.pareto) for r in back] == \
        [(r.id, r.flops, r.acc1, r.loss, r.is_anchor, r.pareto) for r in results]
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt"),
    ('{"format": "snnet", "anchors": []}', "list"),
    ('[{"id": 0, "name": "x", "flops": 1}]', "params"),
    ('[{"id": 0, "name": "x", "flops": 1.5, "params": 1, "acc1": 1, "acc5": 1, "is_anchor": true}]', "integer"),
    ('[{"id": 0, "name": "x", "flops": 1, "params": 1, "acc1": 1, "acc5": 1, "is_anchor": true},'
     ' {"id": 0, "name": "y", "flops": 2, "params": 1, "acc1": 1, "acc5": 1, "is_anchor": false}]', "twice"),
])
def test_load_results_rejects_foreign_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        load_results(path)
    with pytest.raises(ResultsError, match="snnet eval"):
        load_results(tmp_path / "missing")


def test_format_results_marks_the_frontier() -> None:
    results = [_r(0, 5, 10.0), _r(1, 10, 50.0), _r(2, 20, 40.0)]
    text = format_results(results)
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith(" ") or line[:1].isdigit()}
    assert lines["net0"].rstrip().endswith("*") and lines["net1"].rstrip().endswith("*")
    assert not lines["net2"].rstrip().endswith("*")
    assert "2 on the Pareto frontier" in text and "best top-1 50.00% (net1)" in text


def test_format_results_best_top1_skips_a_nan_row() -> None:
    """A first row with a NaN top-1 (not measured) was reported as the best ("best top-1 nan%"): max() keeps
    the first item when every comparison with NaN is False."""
    text = format_results([_r(0, 5, math.nan), _r(1, 10, 50.0), _r(2, 20, 40.0)])
    assert "best top-1 50.00% (net1)" in text and "nan" not in text.splitlines()[-1]
    assert "no measured top-1" in format_results([_r(0, 5, math.nan)])


def test_check_writable(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnnetError, match="cannot write to"):
        check_writable(tmp_path / "file" / "sub")


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 3-class stitched network on disk and a 3-class ImageFolder of 32x32 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS, num_classes=3)
    net.save_pretrained(root / "net")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / "data" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "data" / f"class{c}" / f"{i}.png")
    return root / "net", root / "data"


def test_cli_eval_writes_all_outputs(saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, data = saved
    out = tmp_path / "out"
    code = _run(["eval", "--model", str(model), "--data", str(data), "--batch-size", "4", "--limit", "7",
                 "--out", str(out), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "pareto.html", "pareto.png"}
    results = load_results(out)
    assert len(results) == len(snnet.load(model).space) and all(r.images == 7 for r in results)
    assert "Pareto frontier" in printed and results[0].name in printed


def test_cli_eval_calibrates_and_limits_on_images_of_every_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder lists its classes one after another: `snnet eval --calib-images 10 --limit 10` fitted the
    stitching layers on, and evaluated, the first ten images, all of class0. Both are now a seeded choice spread
    over the classes, the same in every run."""
    import snnet.evaluate as snnet_evaluate
    from snnet.model import StitchedNet

    data = _folder(tmp_path / "data", classes=10, per_class=5, mode="L", size=28)
    seen: dict[str, list[list[int]]] = {"calibration": [], "evaluation": []}
    fit, run = StitchedNet.init_stitching, snnet_evaluate.evaluate

    def recording_fit(self, batches, *args, **kwargs):
        seen["calibration"].append([int(y) for _, labels in batches for y in labels])
        return fit(self, batches, *args, **kwargs)

    def recording_eval(net, loader, *args, **kwargs):
        seen["evaluation"].append([int(y) for _, labels in loader for y in labels])
        return run(net, loader, *args, **kwargs)

    monkeypatch.setattr(StitchedNet, "init_stitching", recording_fit)
    monkeypatch.setattr(snnet_evaluate, "evaluate", recording_eval)
    for k in range(2):
        assert _run(["eval", "--data", str(data), "--split", "train", "--calib-images", "10", "--limit", "10",
                     "--stitches", "0", "--out", str(tmp_path / f"o{k}"), "--no-progress", "--device", "cpu"]) == 0
    for what, (first, again) in seen.items():
        assert len(first) == 10 and len(set(first)) >= 4, (what, first)  # not ten images of class0
        assert again == first, what  # the same images in every run


def test_cli_eval_keeps_a_profile_written_into_its_folder(saved: tuple[Path, Path], tmp_path: Path) -> None:
    """`snnet profile --out DIR` then `snnet eval --out DIR` (the order the profile's own hint gave) replaced
    results.json with the evaluation alone: every latency and peak memory measured was lost."""
    model, data = saved
    out = tmp_path / "out"
    assert _run(["profile", "--model", str(model), "--repeats", "1", "--warmup", "0", "--stitches", "0,3",
                 "--batch-sizes", "1,2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    profiled = {r.id: r for r in load_results(out) if r.latency_ms is not None}
    assert sorted(profiled) == [0, 3]
    assert _run(["eval", "--model", str(model), "--data", str(data), "--batch-size", "4", "--limit", "7",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    rows = {r.id: r for r in load_results(out)}
    assert all(r.acc1 is not None and r.images == 7 for r in rows.values())
    for k, before in profiled.items():
        assert (rows[k].latency_ms, rows[k].peak_mem_mb, rows[k].latency_by_batch) == \
            (before.latency_ms, before.peak_mem_mb, before.latency_by_batch)
        assert rows[k].value("profile") == before.value("profile")
    assert all(r.latency_ms is None for k, r in rows.items() if k not in profiled)


def test_cli_eval_subset(saved: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = saved
    net = snnet.load(model)
    code = _run(["eval", "--model", str(model), "--data", str(data), "--stitches", f"0, {net.space[4].name}",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert [r.id for r in load_results(tmp_path)] == [0, 4]


def test_cli_eval_unwritable_out_fails_before_work(saved: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = saved
    ran = []
    monkeypatch.setattr("snnet.evaluate.evaluate", lambda *a, **k: ran.append(1))
    monkeypatch.setattr("snnet.model.StitchedNet.from_pretrained", classmethod(lambda *a, **k: ran.append(1)))
    (tmp_path / "file").write_text("x")
    code = _run(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "file" / "out")])
    assert code == 2 and not ran
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "--out" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_eval_class_mismatch(saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    model, data = saved
    two = tmp_path / "two"
    shutil.copytree(data, two)
    shutil.rmtree(two / "class2")
    ran = []
    monkeypatch.setattr("snnet.evaluate.evaluate", lambda *a, **k: ran.append(1))
    code = _run(["eval", "--model", str(model), "--data", str(two), "--out", str(tmp_path / "o")])
    assert code == 2 and not ran
    assert "2 classes but the network predicts 3" in capsys.readouterr().err


def test_cli_eval_default_family_fits_stitching_layers(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --model the default family is built and its stitching layers fitted on training images."""
    from PIL import Image

    monkeypatch.setattr("snnet.commands.options.DEFAULT_ANCHORS", "snnet_tiny_vit_ti,snnet_tiny_vit_s")  # 10 classes
    built = []
    create = snnet.model.create_snnet

    def no_weights(anchors, **kw):  # the tiny models have no weights to load
        built.append((anchors, kw.pop("pretrained")))
        return create(anchors, **kw)

    monkeypatch.setattr("snnet.model.create_snnet", no_weights)
    for c in range(10):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (25 * c, 0, 0)).save(tmp_path / "data" / f"c{c}" / "0.png")
    code = _run(["eval", "--data", str(tmp_path / "data"), "--calib-images", "6", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert built == [(["snnet_tiny_vit_ti", "snnet_tiny_vit_s"], True)]  # asked for the shipped weights
    assert "least squares on 6 training images" in captured.err
    assert all(r.images == 10 for r in load_results(tmp_path / "o"))


# ----------------------------------------------------------------- SN-Netv2: two-way routes, low-rank stitching layers


def test_shared_prefix_eval_equals_each_v2_route_alone() -> None:

    net = fitted_net(two_way=True, chains=True)
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


def test_labels_of_any_integer_type_are_scored_and_trained_on(tmp_path: Path) -> None:
    # labels read from numpy often come as int32: cross-entropy takes int64 only, and failed deep inside torch
    from snnet.train import train

    from .conftest import Synthetic, cfg, fresh_net

    net = fitted_net().eval()
    batches = _batches()
    as_int32 = [(x, y.to(torch.int32)) for x, y in batches]
    want = evaluate(net, batches, stitches=[0, 3], progress=False)
    got = evaluate(net, as_int32, stitches=[0, 3], progress=False)
    assert [(r.acc1, r.loss) for r in got] == [(r.acc1, r.loss) for r in want]
    data = Synthetic(n=16)
    data.tensors = (data.tensors[0], data.tensors[1].to(torch.int32))
    assert train(fresh_net(), data, cfg(tmp_path, init_images=0)).step == 2
