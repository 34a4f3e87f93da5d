"""The demo runs end to end (quick mode) and writes every file it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import snnet
from snnet.cli import main
from snnet.demo import CONVERGED_FILE, anchor_specs, converged_verdict, demo_config
from snnet.model import space_options
from .conftest import _cli, _one_line


def test_quick_demo_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    # 100 test images: every stitch is evaluated on them, and no check below depends on how many (300 cost seconds)
    main(["demo", "--quick", "--steps", "6", "--eval-limit", "100", "--train-limit", "2000", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "pareto.html", "pareto.png", "results.csv", "results.json", "summary.json"]
    all_rows = json.loads((out / "results.json").read_text())
    space = snnet.create_snnet("fmnist", **space_options(demo_config().space)).space  # the recipe's space
    rows = [r for r in all_rows if r["kind"] != "zoo"]
    assert len(rows) == len(space) and [r["id"] for r in rows] == list(range(len(space)))
    assert [r["name"] for r in rows] == [s.name for s in space]
    assert [r["kind"] for r in rows] == ["anchor" if r["is_anchor"] else "stitch" for r in rows]
    assert all({"id", "name", "flops", "params", "acc1", "acc5", "is_anchor", "pareto"} <= set(r) for r in rows)
    assert sum(r["is_anchor"] for r in rows) == 3 and any(r["pareto"] for r in rows)
    assert all(0 <= r["acc1"] <= 100 and r["images"] == 100 for r in rows)
    # the zoo beside them: every model of the shipped zoo table, with its test top-1, on its own frontier
    zoo_table = json.loads((Path(snnet.__file__).parent / "weights" / "fmnist_zoo.json").read_text())["models"]
    zoo = {r["name"]: r for r in all_rows if r["kind"] == "zoo"}
    assert set(zoo) == {m["name"] for m in zoo_table} and all(zoo[m["name"]]["acc1"] == m["test_acc1"] for m in zoo_table)
    assert all(r["id"] is None and r["images"] == 10_000 for r in zoo.values()) and any(r["pareto"] for r in zoo.values())
    csv_kinds = [line.split(",")[2] for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert csv_kinds.count("zoo") == len(zoo) and len(csv_kinds) == len(all_rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "pareto.html").read_text()
    assert "plotly" in html.lower() and "fmnist_vit_ti[:" in html and "fmnist_vit_w32_d12_p7" in html
    summary = json.loads((out / "summary.json").read_text())
    verdict = summary["zoo"]
    assert verdict["verdict"] in ("ahead of", "on par with", "behind") and verdict["zoo_models"] == len(zoo)
    anchor_flops = [r["flops"] for r in rows if r["is_anchor"]]
    assert verdict["flops_range"] == [min(anchor_flops), max(anchor_flops)]
    assert verdict["worst"]["diff"] <= verdict["mean_diff"] <= verdict["best"]["diff"]
    assert verdict["joint_image_steps"] == 6 * summary["config"]["train"]["data"]["batch_size"]
    assert "Against the zoo" in printed and "a smoke run, not a comparison" in printed
    assert set(summary["anchors_before"]) == {"fmnist_vit_ti", "fmnist_vit_s", "fmnist_vit_b"}
    assert summary["switches"] and all(s["flops"] <= s["budget_flops"] for s in summary["switches"])
    assert "Run-time switching" in printed and "Pareto" in printed and "standard error" in printed
    # the verdict, one line each: the range, the zoo as trained, a converged zoo (the shipped comparison)
    lines = summary["verdict"]
    assert len(lines) == 3 and all(f"  {line}" in printed for line in lines)
    assert lines[0].startswith("one network for many budgets: " + ("yes" if summary["frontier_filled"] else "NO"))
    # the widest gap is named: two Pareto-optimal networks (or the range's ends) that far apart, none between them
    (a, fa), (b, fb) = summary["widest_gap_between"]
    assert (fb - fa) / (max(anchor_flops) - min(anchor_flops)) == pytest.approx(summary["max_frontier_gap"])
    by_name = {r["name"]: r for r in rows}
    assert all(by_name[n]["pareto"] or by_name[n]["is_anchor"] for n in (a, b)) and by_name[a]["flops"] == fa
    assert not any(r["pareto"] and fa < r["flops"] < fb for r in rows) and f"{a} (" in printed
    assert f"{verdict['mean_diff']:+.2f} points on average" in lines[1] and verdict["verdict"] in lines[1]
    converged = json.loads(CONVERGED_FILE.read_text())
    assert lines[2].startswith("against a converged zoo, from converged anchors: ")
    assert f"{converged['mean_diff']:+.2f} points on average" in lines[2] and f"worst {converged['worst']['diff']:+.2f}" in lines[2]
    # the training run's own files
    assert (out / "train" / "metrics.jsonl").read_text().count("\n") == 6
    assert (out / "train" / "final" / "model.safetensors").is_file()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snnet", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_unwritable_output_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _run("demo", "--quick", "--out", str(blocker / "out"))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert "train" not in proc.stdout


# The refusals below run the command in this process (the real command's exit and one-line error are
# checked by the test above): a subprocess would import torch and timm again for each of them.


def test_missing_dataset_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli("demo", "--quick", "--out", str(tmp_path / "out"), "--data.root", str(tmp_path / "empty")) == 2
    assert "dataset-fashion-mnist" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "results.json").exists()
    # --data names the dataset, in every command: the demo says where its folder goes instead
    assert _cli("demo", "--quick", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "empty")) == 2
    assert "give the folder of its IDX files as --data.root DIR" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, says", [(["--sampler", "by-luck"], "unknown sampler 'by-luck'"),
                                        (["--steps", "0"], "schedule.max_steps must be >= 1"),
                                        (["--lr", "-1"], "lr must be > 0"),
                                        (["--eval-split", "dev"], "unknown evaluation split 'dev'; use test or val"),
                                        # measured on images it trained on: training accuracy, reported as the demo's
                                        (["--data.split", "train+val", "--eval-split", "val"],
                                         "data.split 'train+val' trains on the val images the demo measures on"),
                                        (["--data.split", "test"], "data.split 'test' trains on the test images the demo "
                                                                   "measures on (demo.eval_split test)"),
                                        (["--weights", "{tmp}/nowhere.safetensors,{tmp}/b.safetensors"], "is not a file"),
                                        (["--weights", "{tmp}/weights"], "holds 1 .safetensors file(s)"),
                                        (["--weights", "{tmp}/weights/resnet9.safetensors,{tmp}/weights/resnet9.safetensors"],
                                         "cannot tell the architecture of"),
                                        # explicit routes name their anchors: the shipped family's are not these
                                        (["--weights", "{tmp}/fmnist_vit_w16_d2_p7.safetensors,"
                                          "{tmp}/fmnist_vit_w24_d2_p7.safetensors",
                                          "--space.routes", '["fmnist_vit_ti[:1]+fmnist_vit_s[1:]"]'],
                                         "space.routes names fmnist_vit_ti, fmnist_vit_s, not among the anchors of "
                                         "--demo.weights (fmnist_vit_w16_d2_p7, fmnist_vit_w24_d2_p7)"),
                                        # so do the stitches the recipe draws more often
                                        (["--weights", "{tmp}/fmnist_vit_w16_d2_p7.safetensors,"
                                          "{tmp}/fmnist_vit_w24_d2_p7.safetensors"],
                                         "sampling.weighted_stitches names fmnist_vit_s, fmnist_vit_b, not among the "
                                         "anchors of --demo.weights (fmnist_vit_w16_d2_p7, fmnist_vit_w24_d2_p7): give "
                                         "names of those anchors, or --sampling.sampler uniform")])
def test_bad_demo_settings_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                                      says: str) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet9.safetensors").write_bytes(b"")
    for name in ("fmnist_vit_w16_d2_p7", "fmnist_vit_w24_d2_p7"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert _cli("demo", "--quick", "--out", str(tmp_path / "out"), *args) == 2
    assert says in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_demo_takes_anchor_weights_and_measures_on_val(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Anchors from files of zoo architectures, measured on the validation split."""
    import timm
    import torch
    from safetensors.torch import save_file

    from snnet.data import FashionMNIST
    from snnet.pretrained import FmnistVitSpec

    weights = tmp_path / "anchors"
    weights.mkdir()
    torch.manual_seed(123)  # not the demo's seed: the anchors must come from the files, not from init
    files = {}
    for name in ("fmnist_vit_w24_d2_p7", "fmnist_vit_w16_d2_p7"):
        model = timm.create_model("fmnist_vit", **FmnistVitSpec.parse(name).model_kwargs())
        files[name] = weights / f"{name}.safetensors"
        save_file(model.state_dict(), str(files[name]))
    out = tmp_path / "demo"
    # the stitches the recipe draws more often name the shipped family: other anchors are drawn uniformly
    main(["demo", "--weights", str(weights), "--sampling.sampler", "uniform", "--eval-split", "val", "--steps", "3",
          "--eval-limit", "200", "--train-limit", "500", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "val" and "on 200 val images" in printed
    # Before training, each anchor scores what its file scores on the same 200 validation images.
    val = FashionMNIST(split="val", limit=200)
    for name, file in files.items():
        model = timm.create_model("fmnist_vit", pretrained=True, pretrained_cfg_overlay={"file": str(file)},
                                  **FmnistVitSpec.parse(name).model_kwargs()).eval()
        with torch.no_grad():
            acc = 100 * float((model(torch.stack([x for x, _ in val])).argmax(-1) == val.labels).float().mean())
        assert summary["anchors_before"][name] == pytest.approx(acc, abs=1e-6)
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows if r["is_anchor"]] == ["fmnist_vit_w16_d2_p7", "fmnist_vit_w24_d2_p7"]
    labels, specs = zip(*anchor_specs((str(weights),)))
    rule = snnet.create_snnet(list(specs), labels=list(labels), **space_options(demo_config().space)).space  # the recipe's rule
    assert [r["name"] for r in rows if r["kind"] != "zoo"] == [s.name for s in rule]
    assert all(r["images"] == 200 for r in rows if r["kind"] != "zoo")
    # The same files given one by one build the same network.
    main(["demo", "--weights", ",".join(str(f) for f in files.values()), "--sampling.sampler", "uniform", "--eval-split",
          "val", "--steps", "3", "--eval-limit", "200", "--train-limit", "500", "--out", str(tmp_path / "again"), "--no-progress"])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [(r["name"], r["acc1"]) for r in again] == [(r["name"], r["acc1"]) for r in rows]


def test_demo_without_the_zoo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    main(["demo", "--quick", "--steps", "2", "--eval-limit", "100", "--train-limit", "500", "--no-zoo", "--out", str(out),
          "--no-progress"])
    assert {r["kind"] for r in json.loads((out / "results.json").read_text())} == {"anchor", "stitch"}
    assert json.loads((out / "summary.json").read_text())["zoo"] is None


def test_converged_line_reads_the_comparison_file(tmp_path: Path) -> None:
    """The verdict's converged line is the comparison script's file, in words; a missing or broken
    file says so in the line instead of failing the demo at its end."""
    v = json.loads(CONVERGED_FILE.read_text())
    line = converged_verdict()
    assert f"{v['mean_diff']:+.2f} points on average" in line and f"{v['on_frontier']} of its {v['networks']}" in line
    behind = tmp_path / "behind.json"
    behind.write_text(json.dumps({**v, "mean_diff": -3.0}))
    assert converged_verdict(behind).startswith("behind it")
    broken = tmp_path / "broken.json"
    broken.write_text('{"split": "val"')
    assert converged_verdict(broken).startswith("not available (broken.json: JSONDecodeError")
    assert converged_verdict(tmp_path / "missing.json").startswith("not available (missing.json: FileNotFoundError")


def _net_row(id: int, flops: int, acc1: float, pareto: bool, anchor: bool = False) -> "Row":
    from snnet.results import Row

    return Row(id, f"n{id}", flops, 1, acc1, 99.0, 0.5, 10_000, anchor, pareto)


def test_frontier_gap_leaves_zoo_and_reference_rows_aside() -> None:
    """A results.json the demo wrote holds the zoo too, each zoo model marked on the zoo's own frontier:
    the gap is the stitched network's, so zoo (and reference) rows must neither fill it nor set the range."""
    from snnet.demo import frontier_gap, gap_ends
    from snnet.results import Row

    net = [_net_row(0, 100, 80.0, True, anchor=True), _net_row(1, 200, 81.0, True), _net_row(2, 1100, 85.0, True, anchor=True)]
    zoo = [Row(None, "z600", 600, 1, 82.0, kind="zoo", pareto=True),
           Row(None, "z50", 50, 1, 70.0, kind="zoo", pareto=True)]
    ref = [Row(2, "ref_b", 2000, 1, 86.0, kind="reference", is_anchor=True, pareto=True)]
    assert frontier_gap(net) == pytest.approx(0.9)
    assert frontier_gap(net + zoo + ref) == pytest.approx(0.9)
    assert gap_ends(net + zoo + ref) == (("n1", 200), ("n2", 1100), pytest.approx(0.9))


def test_frontier_gap_of_anchors_of_one_cost_is_zero_not_a_crash() -> None:
    """Two anchors of the same architecture (`--demo.weights` of one model twice) have no FLOPs range:
    the gap divided by zero."""
    from snnet.demo import frontier_gap, widest_gap

    net = [_net_row(0, 100, 80.0, True, anchor=True), _net_row(1, 100, 81.0, True, anchor=True)]
    assert frontier_gap(net) == 0.0 and widest_gap([100], 100, 100) == 0.0


def test_verdict_says_why_the_zoo_was_not_compared() -> None:
    """With the zoo asked for but dearer than every anchor (compare_with_zoo gives None), the verdict
    must not claim the user passed --no-zoo."""
    from snnet.demo import DemoResult, compare_with_zoo, verdict_lines
    from snnet.results import Row

    net = [_net_row(0, 100, 80.0, True, anchor=True), _net_row(1, 150, 81.0, True), _net_row(2, 200, 85.0, True, anchor=True)]
    zoo = [Row(None, "z600", 600, 1, 82.0, kind="zoo")]
    assert compare_with_zoo(net, zoo, 1000, 1.0) is None

    def line(zoo_on: bool) -> str:
        s = DemoResult(net, {"n0": 80.0, "n2": 85.0}, {"n0": 80.0, "n2": 85.0}, 3, [],
                       config={"train": {}, "demo": {"zoo": zoo_on}}, zoo=None)
        return verdict_lines(s)[1]
    assert "--no-zoo" in line(False)
    assert "--no-zoo" not in line(True) and "not compared" in line(True)


def test_lm_quick_help_says_what_it_does_with_a_given_limit(capsys: pytest.CaptureFixture) -> None:
    """`snnet demo --lm --quick` lowers a larger --train-limit or --demo.eval_blocks to its smoke-run caps: its help
    said "(unless given)", which the run contradicted."""
    pytest.importorskip("transformers")
    main(["demo", "--lm", "--quick", "--train-limit", "100", "--demo.eval_blocks", "20", "--print-config"])
    printed = capsys.readouterr().out
    assert "limit: 64" in printed and "eval_blocks: 8" in printed
    with pytest.raises(SystemExit):
        main(["demo", "--lm", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "unless given" not in help_text and "more are lowered" in help_text
