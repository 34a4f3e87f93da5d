"""The test suite passes however it is started: a background job (`pytest &`, `nohup pytest &`)
starts Python with SIGINT ignored, and the tests of Ctrl-C must see what a terminal gives them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_pytest_started_with_sigint_ignored_gives_its_tests_pythons_ctrl_c_handler(tmp_path: Path) -> None:
    """A test (and the processes it starts) under this suite's conftest sees Python's own Ctrl-C handler even
    when pytest itself was started with SIGINT ignored; it saw "ignore" before, and the Ctrl-C test of
    training (which checks that training restores the handler it found) failed under nohup."""
    (tmp_path / "test_sigint.py").write_text(
        "import signal, subprocess, sys\n"
        "def test_handler():\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "    child = 'import signal; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler'\n"
        "    subprocess.run([sys.executable, '-c', child], check=True)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "tests.conftest",
         str(tmp_path / "test_sigint.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
