"""The test suite passes however it is started: here, the Ctrl-C test run as a background job runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_ctrl_c_test_passes_with_sigint_ignored_as_in_a_background_job() -> None:
    """`pytest &` (and `nohup pytest &`) starts Python with SIGINT ignored; the Ctrl-C test must pass there too."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_runs.py::test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
