"""The wait before the ring (snnet.deploy.serve.upstream): arrivals stamped when a request's first
bytes are read, the requests not yet in the ring published to the model process (issue 20).

The protocol is fed bytes directly (no socket: what it admits before any handler runs is then
deterministic); the whole server runs in-process as in tests/test_serve.py, with snnet's protocol."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from uvicorn.config import Config  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from snnet.deploy.serve import ServeConfig, Service  # noqa: E402
from snnet.deploy.serve.engine import RingState  # noqa: E402
from snnet.deploy.serve.upstream import ARRIVED, KEY, StampedProtocol, Upstream, stamped  # noqa: E402

from .conftest import _png  # noqa: E402
from .test_serve import _multipart, _Server, saved  # noqa: E402,F401 - saved: the tiny network and its results, a fixture


def test_the_ring_words_carry_what_waits_before_the_ring() -> None:
    state = RingState(np.zeros(RingState.WORDS, np.int64))
    up = Upstream(state)
    assert state.upstream() is None
    a = up.admit(100.0)
    up.admit(100.004)
    w = state.upstream()
    assert w is not None and w.requests == 2 and w.oldest == pytest.approx(100.0)
    up.leave(a)
    up.leave(a)  # twice: nothing more
    up.worked(2.0, 16)
    w = state.upstream()
    assert w is not None and w.requests == 1 and w.oldest == pytest.approx(100.004) and w.work_ms == pytest.approx(2.0)
    assert w.images == pytest.approx(0.9 + 1.6)  # the running mean of images a request moves from 1 toward 16
    up.admit(200.0)  # an entry older than stale_s (60 s: a request whose handler never ran) is dropped
    assert len(up) == 1 and up.oldest() == 200.0


def test_the_oldest_waiting_is_the_oldest_arrival_whatever_the_order_admitted() -> None:
    """A slow upload is admitted when its body is in, after requests that arrived after its first bytes: the
    oldest published is still its arrival (it was the first admitted's, later than it)."""
    state = RingState(np.zeros(RingState.WORDS, np.int64))
    up = Upstream(state)
    fast = up.admit(100.5)  # first bytes at 100.5, all here at once
    slow = up.admit(100.0)  # first bytes at 100.0, the rest of its body in after the fast one's
    w = state.upstream()
    assert up.oldest() == 100.0 and w is not None and w.oldest == pytest.approx(100.0)
    up.leave(slow)
    assert up.oldest() == 100.5
    up.leave(fast)
    up.admit(10.0)
    up.admit(9.0)
    up.admit(100.0)  # both older than stale_s (60 s) are dropped, not only the first admitted
    assert len(up) == 1 and up.oldest() == 100.0


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


def test_the_protocol_stamps_arrivals_and_admits_predictions_before_any_handler_runs() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:  # never reached: no turn of the loop is taken
        raise AssertionError("the handler ran")

    async def main() -> None:
        up = Upstream()
        config = Config(app=app, log_level="warning", lifespan="off")
        config.load()
        proto = stamped(up)(config=config, server_state=ServerState(), app_state={})
        proto.connection_made(_Transport())
        t0 = time.perf_counter()
        proto.data_received(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")  # a head split over two reads
        first = proto.scope
        assert first[ARRIVED] >= t0 and KEY not in first and len(up) == 0
        time.sleep(0.01)
        proto.data_received(b"ngth: 3\r\n\r\nabc")
        assert proto.scope is first and first[KEY] is not None and len(up) == 1
        assert up.oldest() == first[ARRIVED] < time.perf_counter() - 0.01  # admitted with the time of its first bytes
        slow = stamped(up)(config=config, server_state=ServerState(), app_state={})
        slow.connection_made(_Transport())
        slow.data_received(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")  # its body still arriving
        assert KEY not in slow.scope and len(up) == 1
        slow.data_received(b"cdef")
        assert slow.scope[KEY] is not None and len(up) == 2 and up.oldest() == first[ARRIVED]
        up.leave(slow.scope[KEY])
        other = stamped(up)(config=config, server_state=ServerState(), app_state={})
        other.connection_made(_Transport())
        other.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # not a prediction: stamped, not admitted
        assert ARRIVED in other.scope and other.scope[KEY] is None and len(up) == 1
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    asyncio.run(main())


def test_a_served_request_reports_its_time_before_the_ring_and_leaves_nothing_waiting(saved: tuple[Path, Path]) -> None:
    model, results = saved
    service = Service.load(ServeConfig(str(model), str(results), max_batch=8, inline_max_images=0, max_upload_bytes=2 ** 20))
    with _Server(service, http=StampedProtocol) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert StampedProtocol.upstream is service.upstream
        body, ctype = _multipart([("file", _png(seed=k), f"{k}.png") for k in range(3)])
        r = c.post("/predict", content=body, headers={"content-type": ctype}).json()
        assert 0 < r["before_ring_ms"] <= r["latency_ms"]
        h = c.get("/health").json()
        assert h["before_ring"] == 0 and h["server_work_ms"] > 0
        assert service.batcher.state.upstream() is None  # what the model process reads: nothing waits
        assert "snnet_before_ring_seconds_count 1.0" in c.get("/metrics").text
        # an oversized body gets its 413 before it is all read: never counted as waiting for the ring
        big = c.post("/predict", content=b"x" * (3 * 2 ** 20), headers={"content-type": "image/png"})
        assert big.status_code == 413 and len(service.upstream) == 0 and c.get("/health").json()["before_ring"] == 0
    assert StampedProtocol.upstream is None


def test_steady_cv2_reaches_the_controller_and_is_checked(saved: tuple[Path, Path]) -> None:
    from snnet.deploy.serve.engine import _policy
    from snnet.errors import ServeError
    from snnet.results import read_rows

    model, results = saved
    rows = read_rows(results)
    assert _policy("controller", rows, ServeConfig(str(model), max_batch=8)).config.steady is None  # off by default
    assert _policy("controller", rows, ServeConfig(str(model), max_batch=8, steady_cv2=2.0)).config.steady == (2.0, 1.0)
    with pytest.raises(ServeError, match="--steady-cv2"):
        ServeConfig(str(model), steady_cv2=-1.0)


@pytest.mark.parametrize("name, value", [("utilisation", 1.0), ("headroom", 0.95)])
def test_controller_settings_reach_the_controller_and_are_checked(saved: tuple[Path, Path], name: str, value: float) -> None:
    """--utilisation (the DeiT benchmark serves with 1: what the controller may load a stitch to) and --headroom (the
    share of the SLO it plans within): their defaults the controller's own, on the command line too (which does not
    import the controller to say so)."""
    import inspect

    from snnet.commands.serve import serve
    from snnet.deploy.controller import ControllerConfig
    from snnet.deploy.serve.engine import _policy
    from snnet.errors import ServeError
    from snnet.results import read_rows

    model, results = saved
    rows = read_rows(results)
    default = getattr(ControllerConfig, name)
    assert getattr(_policy("controller", rows, ServeConfig(str(model), max_batch=8)).config, name) == default != value
    assert getattr(_policy("controller", rows, ServeConfig(str(model), max_batch=8, **{name: value})).config, name) == value
    assert inspect.signature(serve).parameters[name].default == default
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ServeError, match=f"--{name} must be a number above 0 and at most 1"):
            ServeConfig(str(model), **{name: bad})


def test_a_pipelining_client_that_leaves_leaves_nothing_waiting_and_no_traceback(saved: tuple[Path, Path], capfd: Any) -> None:
    """HTTP/1.1 pipelining, then the client goes: uvicorn never starts the requests queued behind the one
    being answered, and marks only the newest read as disconnected. The queued ones must leave the
    Upstream with the connection (else each counts as waiting, the latency path off and the controller
    planning for it, until it goes stale a minute later), and the one being answered must not write to
    the closed socket (uvloop's RuntimeError, logged as "Exception in ASGI application")."""
    import socket
    from urllib.parse import urlsplit

    model, results = saved
    service = Service.load(ServeConfig(str(model), str(results), max_batch=8, inline_max_images=0, max_upload_bytes=2 ** 20))
    png = _png(seed=1)
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n".encode()
    with _Server(service, http=StampedProtocol) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        url = urlsplit(s.url)
        for _ in range(3):
            with socket.create_connection((url.hostname, url.port)) as sock:
                sock.sendall((head + png) * 3)  # one write: the first being answered when the client has gone
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while (waiting := c.get("/health").json()["before_ring"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting == 0 and len(service.upstream) == 0
        assert c.post("/predict", content=png, headers={"content-type": "image/png"}).status_code == 200
    assert "Exception in ASGI application" not in capfd.readouterr().err
