"""The command line: real commands, their output, and their errors (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from snnet.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snnet", *args], capture_output=True, text=True, timeout=300)


def test_stitches_json_lists_the_space(capsys: pytest.CaptureFixture) -> None:
    main(["stitches", "--anchors", "snnet_tiny_vit_ti,snnet_tiny_vit_s,snnet_tiny_vit_b", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 23
    assert all({"id", "name", "flops", "params"} <= set(r) for r in rows)
    assert all(isinstance(r["flops"], int) and isinstance(r["params"], int) for r in rows)
    assert [r["id"] for r in rows] == list(range(23))


def test_stitches_table_and_options(capsys: pytest.CaptureFixture) -> None:
    main(["stitches", "--anchors", "snnet_tiny_vit_ti,snnet_tiny_vit_s", "--img-size", "64", "--stride", "2"])
    out = capsys.readouterr().out
    assert "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[0:]" in out
    assert out.strip().splitlines()[-1].startswith("10 networks (2 anchors, 8 stitches, 2 stitching layers)")
    assert "at 64x64" in out


@pytest.mark.parametrize("args, message", [
    (["stitches", "--anchors", "deit_tiny,snnet_tiny_vit_s"], "unknown model name 'deit_tiny'"),
    (["stitches", "--anchors", "snnet_tiny_vit_s"], "at least two"),
])
def test_errors_are_messages_not_tracebacks(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
