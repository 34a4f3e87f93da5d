"""The demo runs end to end (quick mode) and writes every file it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snnet.cli import main


def test_quick_demo_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    main(["demo", "--quick", "--steps", "6", "--eval-limit", "300", "--train-limit", "2000", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "pareto.html", "pareto.png", "results.csv", "results.json", "summary.json"]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 35 and [r["id"] for r in rows] == list(range(35))
    assert all({"id", "name", "flops", "params", "acc1", "acc5", "is_anchor", "pareto"} <= set(r) for r in rows)
    assert sum(r["is_anchor"] for r in rows) == 3 and any(r["pareto"] for r in rows)
    assert all(0 <= r["acc1"] <= 100 and r["images"] == 300 for r in rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "pareto.html").read_text()
    assert "plotly" in html.lower() and "fmnist_vit_ti[:" in html
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["anchors_before"]) == {"fmnist_vit_ti", "fmnist_vit_s", "fmnist_vit_b"}
    assert summary["switches"] and all(s["flops"] <= s["budget_flops"] for s in summary["switches"])
    assert "Run-time switching" in printed and "Pareto" in printed and "standard error" in printed
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


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    proc = _run("demo", "--quick", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("args, says", [(["--sampler", "by-luck"], "unknown sampler 'by-luck'"),
                                        (["--steps", "0"], "steps and batch sizes must be >= 1"),
                                        (["--lr", "-1"], "lr must be > 0")])
def test_bad_demo_settings_are_refused_before_any_work(tmp_path: Path, args: list[str], says: str) -> None:
    proc = _run("demo", "--quick", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
