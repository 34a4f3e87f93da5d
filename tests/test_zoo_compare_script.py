"""scripts/fmnist_zoo_compare.py: one run against the zoo, and the trade-off curve of several runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fmnist_zoo_compare.py"
ZOO = ROOT / "snnet" / "weights" / "fmnist_zoo.json"


def _run_copy(tmp: Path, name: str, steps: int, shift: float) -> Path:
    """The shipped demo run (docs/demo) as if trained ``steps`` joint steps, every stitch ``shift`` points off."""
    out = tmp / name
    # the run's files, not its training folder (`snnet demo --out docs/demo` leaves one, git-ignored)
    shutil.copytree(ROOT / "docs" / "demo", out, ignore=shutil.ignore_patterns("train"))
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        if r.get("kind") == "stitch":
            r["acc1"] = round(r["acc1"] + shift, 2)
    (out / "results.json").write_text(json.dumps(rows))
    summary = json.loads((out / "summary.json").read_text())
    summary["config"]["train"]["schedule"]["max_steps"] = steps
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "train").mkdir()  # the training's log: one step on each network
    ids = [r["id"] for r in rows if r.get("kind") in ("anchor", "stitch")]
    (out / "train" / "metrics.jsonl").write_text("".join(json.dumps({"step": k + 1, "stitch": i}) + "\n" for k, i in enumerate(ids)))
    return out


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_curve_orders_runs_by_cost_and_reflects_their_accuracy(tmp_path):
    worse = _run_copy(tmp_path, "worse", 875, -2.0)
    better = _run_copy(tmp_path, "better", 3500, 0.0)
    curve = tmp_path / "curve" / "steps.png"
    done = _script(str(better), str(worse), "--zoo", str(ZOO), "--curve", str(curve))
    assert done.returncode == 0, done.stderr
    rows = json.loads(curve.with_suffix(".json").read_text())["runs"]
    assert [r["steps"] for r in rows] == [875, 3500]  # cheapest first, whatever the order given
    assert [r["image_steps"] for r in rows] == [875 * 64, 3500 * 64]
    assert rows[0]["mean"] < rows[1]["mean"]  # stitches 2 points down: a lower mean against the same zoo
    assert rows[0]["zoo_in_range"] == rows[1]["zoo_in_range"] > 0
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_run_still_prints_the_full_comparison(tmp_path):
    run = _run_copy(tmp_path, "run", 3500, 0.0)
    done = _script(str(run), "--zoo", str(ZOO))
    assert done.returncode == 0, done.stderr
    assert "Between each pair of neighbouring anchors" in done.stdout and "Training cost" in done.stdout
    networks = sum(r.get("kind") in ("anchor", "stitch") for r in json.loads((run / "results.json").read_text()))
    assert f"Joint training: {networks} steps over {networks} networks: 1-1 steps" in done.stdout
