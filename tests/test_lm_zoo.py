"""The LM zoo comparison: ``scripts/train_lm_family.py --zoo`` (members trained alone) and
``scripts/lm_zoo_compare.py`` (the demo's stitches against them at matched FLOPs per token).

The comparison is checked on the files the docs quote (``docs/lm-demo``): the demo's results and
the zoo measured on the same held-out blocks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from snnet.errors import ResultsError  # noqa: E402
from snnet.lm_family import CONTEXT, STDLIB_LM_ARCHS, STDLIB_LM_ZOO_ARCHS, lm_arch  # noqa: E402
from snnet.results import StitchResult  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "docs" / "lm-demo"


def _script():
    spec = importlib.util.spec_from_file_location("lm_zoo_compare", ROOT / "scripts" / "lm_zoo_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _row(name: str, flops: int, bpb: float) -> StitchResult:
    return StitchResult(0, name, flops, 1, 0.0, 0.0, 0.0, 1, False, bpb=bpb)


def test_zoo_members_are_the_family_design_at_other_widths() -> None:
    for name, arch in STDLIB_LM_ZOO_ARCHS.items():
        assert name not in STDLIB_LM_ARCHS and lm_arch(name) == arch
        assert arch.layers == 4 and arch.hidden % arch.heads == 0
        assert arch.intermediate % 16 == 0 and 0 <= arch.intermediate - arch.hidden * 8 / 3 < 16  # 8/3, rounded up
    assert lm_arch("stdlib-lm-s") == STDLIB_LM_ARCHS["stdlib-lm-s"]
    with pytest.raises(Exception, match="stdlib-lm-w64"):
        lm_arch("stdlib-lm-w65")


def test_interpolation_is_linear_in_log_flops() -> None:
    script = _script()
    front = [_row("a", 100, 3.0), _row("b", 400, 2.0)]
    lo, hi, y = script.interpolate(front, 200)
    assert (lo.name, hi.name) == ("a", "b") and y == pytest.approx(2.5)  # 200 is halfway in log between 100 and 400
    assert script.interpolate(front, 100)[1:] == (None, 3.0)  # on a frontier point: its own figure
    assert script.interpolate(front, 800)[1:] == (None, 2.0)  # past the end: the dearest network's
    with pytest.raises(ResultsError):
        script.interpolate(front, 50)


def test_compare_reads_the_demo_and_the_zoo(tmp_path: Path) -> None:
    script = _script()
    text = script.report(DEMO, DEMO / "zoo.json", tmp_path)
    zoo = json.loads((DEMO / "zoo.json").read_text())
    summary = json.loads((DEMO / "summary.json").read_text())
    # both sides measured on the same blocks: the demo's anchors before its joint training are the zoo's rows
    for name, before in summary["anchors_before"].items():
        assert zoo["models"][name]["held_out_demo"]["bpb"] == pytest.approx(before, abs=1e-4)
        after = summary["anchors_after"][name]
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` | ")
                   and line.count("|") == 8)
        assert f"{after - zoo['models'][name]['held_out_demo']['bpb']:+.4f}" in row  # an anchor faces itself, alone
    assert all(f"`{name}`" in text for name in zoo["models"])
    assert (tmp_path / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in (tmp_path / "zoo.html").read_text()[:100_000]
    assert (tmp_path / "zoo_compare.md").read_text() in text


def test_a_results_file_as_the_zoo_and_text_that_differs(tmp_path: Path) -> None:
    """`snnet eval`'s results.json of a network built from the zoo members works as the zoo (its anchors):
    the demo's own anchors as a zoo face themselves, a difference of 0; a zoo measured on other text is refused."""
    script = _script()
    members = script.load_members(DEMO / "results.json", {"stdlib-lm-xs", "stdlib-lm-s", "stdlib-lm-m"}, 6e5)
    assert [m.row.name for m in members] == ["stdlib-lm-xs", "stdlib-lm-s", "stdlib-lm-m"]
    assert all(m.row.is_zoo and m.tokens == 6e5 and m.seconds is None for m in members)
    front = script.frontier(script.network_rows(script.load_results(DEMO / "results.json")), y="bpb")
    table = script.member_table(front, [m.row for m in members])
    assert table.count("| +0.0000 | +0.0000 |") == 3
    zoo = json.loads((DEMO / "zoo.json").read_text())
    first = next(iter(zoo["models"]))
    zoo["models"][first]["held_out_demo"]["bytes"] += 1
    (tmp_path / "zoo.json").write_text(json.dumps(zoo))
    with pytest.raises(ResultsError, match="different held-out text"):
        script.report(DEMO, tmp_path / "zoo.json", tmp_path)
    assert not math.isnan(members[0].row.value("bpb"))


@pytest.mark.slow
def test_zoo_script_trains_a_member_alone_and_measures_it_on_the_demo_blocks(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """The script's own main, in process, on the first 40 files of the standard library (the tokenizer
    trainer reads all of its text: the whole library would take a minute)."""
    import torch

    from snnet import text

    spec = importlib.util.spec_from_file_location("train_lm_family", ROOT / "scripts" / "train_lm_family.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    monkeypatch.setattr(script, "stdlib_sources", lambda: text.stdlib_sources()[:40])
    common = ["--schedule.max_steps", "2", "--data.limit", "8", "--data.batch_size", "4",
              "--family.runs", str(tmp_path / "runs"), "--family.zoo_out", str(tmp_path / "zoo"),
              "--family.eval_blocks", "2", "--family.demo_blocks", "3", "--family.vocab_size", "300",
              "--run.progress", "false"]
    threads = torch.get_num_threads()
    try:
        script.main(["--zoo", "--family.models", "[stdlib-lm-w32]", *common])
    finally:
        torch.set_num_threads(threads)
    zoo = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    row = zoo["models"]["stdlib-lm-w32"]
    assert row["source"] == "zoo" and row["steps"] == 2 and row["arch"]["hidden"] == 32
    assert row["held_out"]["tokens"] == 2 * CONTEXT and row["held_out_demo"]["tokens"] == 3 * CONTEXT == zoo["demo_tokens"]
    # another recipe and tokenizer than the shipped family's: the family's members are not listed beside it
    assert list(zoo["models"]) == ["stdlib-lm-w32"]
    assert (tmp_path / "runs" / "stdlib-lm-w32" / "metrics.jsonl").read_text().count("\n") == 2  # snnet's loop
    assert not (ROOT / "snnet" / "weights" / "lm" / "stdlib-lm-w32").exists()  # the zoo is not shipped
    with pytest.raises(Exception, match="--zoo trains the zoo"):
        script.main(["--zoo", "--family.models", "[stdlib-lm-s]", *common])
    with pytest.raises(Exception, match="belong.* to the zoo: add --zoo"):
        script.main(["--family.models", "[stdlib-lm-w32]", *common])
