"""Long-lived objects kept out of the garbage collector's way, in a process that serves.

Now and then CPython's cyclic collector runs a full (generation-2) collection, which walks every
container object the process holds. A serving process holds torch, timm, the network and, on the
latency path, ONNX Runtime: a full collection then stops it for 150-190 ms on the project's
CPU (timed with ``gc.callbacks`` during a quick run of ``benchmarks/bench_serve.py``: the server
process made two while serving, 157 and 188 ms, and the benchmark's client two, 148 and 155 ms;
``benchmarks/bench_heap.py`` times one). Under a 20 ms SLO one pause misses every request in
flight. ``gc.freeze()`` moves
everything alive into a permanent generation that collections skip, so once a process has loaded
what it serves, a full collection walks only the objects made since (Instagram's fix for their
Django servers, and CPython's documented use of it, before fork, is the same idea).
"""

from __future__ import annotations

import gc


def freeze_heap() -> int:
    """Keep every object alive now out of later collections, after a full collection so that no
    garbage is kept for good; returns how many objects are frozen in all. At start-up that
    collection is as long as the pauses this prevents; once frozen, it walks only what is not."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def refreeze() -> None:
    """In a process that froze its heap (:func:`freeze_heap`), freeze what it has loaded since (a
    stitch compiled for the latency path; the collection first walks only what is not frozen, about
    a millisecond); in any other process (a test that runs the app in its own interpreter) nothing."""
    if gc.get_freeze_count():
        freeze_heap()
