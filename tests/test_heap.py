"""A serving process keeps what it loaded out of the garbage collector's full passes (snnet.deploy.heap)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    """In a fresh interpreter: freezing is for the whole process, not pytest's."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True).stdout


def test_a_frozen_heap_is_skipped_by_full_collections_and_refrozen_after_a_compile() -> None:
    out = _run("""
        import gc, time
        from snnet.deploy.heap import freeze_heap, refreeze
        refreeze()
        print(gc.get_freeze_count())                      # not frozen: refreeze leaves the process alone
        keep = [[i] for i in range(300_000)]              # a long-lived heap, as torch and a network are
        t = time.perf_counter(); gc.collect(); before = time.perf_counter() - t
        frozen = freeze_heap()
        t = time.perf_counter(); gc.collect(); after = time.perf_counter() - t
        print(frozen >= 300_000, after < before / 5)
        more = [[i] for i in range(1000)]                 # loaded later (a stitch compiled for the latency path)
        refreeze()
        print(gc.get_freeze_count() >= frozen + 1000)
    """).split()
    assert out == ["0", "True", "True", "True"], out
