"""Load for a running `snnet serve`: a lean HTTP/1.1 client, arrival traces, request bodies, and a
server started for a measurement.

The client shares the machine with the server it measures (on this project's 2 cores, it takes
its CPU from the server), so it costs as little as possible per request: each request's bytes
are built once (by httpx, as a client would send them), each connection is a keep-alive asyncio
stream (on uvloop), and a response is read as a status line, headers and ``Content-Length``
bytes. httpx costs several times more CPU per request.

* :func:`closed_loop` — ``clients`` connections, each sending its next request as soon as the
  last one is answered: the server's capacity;
* :func:`open_loop` — requests sent at given times whatever the server does (arrivals do not
  wait for answers): what a server sees from many independent users. A request not answered
  within ``timeout`` is a miss, and its connection is closed;
* :func:`gamma_times`, :func:`ramp_times` — arrival times as the serving papers draw them
  (Gamma gaps of a given burstiness; a rate that climbs and falls back); :func:`trace` names the
  four the bursty benchmark and the simulator (:mod:`snnet.deploy.simulate`) both replay;
* :class:`ServerProcess` — ``snnet serve`` started in a subprocess, waited for, steered with the
  admin token and stopped: what the serving benchmarks in ``benchmarks/`` run against.

Needs the ``serve`` extra (httpx, uvloop, orjson), imported where used.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


# ============================================================================== the client


@dataclass(frozen=True)
class Body:
    """One request, ready to send: the whole HTTP/1.1 request as bytes, and how many images it carries."""

    raw: bytes
    images: int


@dataclass(frozen=True)
class Result:
    """One request: when it was due (s from the start: its scheduled arrival in an open loop, its send in
    a closed one), its latency from then, status (0: transport error or timeout, -1: not sent, the
    generator's connection bound was hit), the response body, and ``lag_ms``: how late the generator
    sent it (counted in ``ms``: a client that falls behind does not hide the wait, coordinated omission)."""

    t: float
    ms: float
    status: int
    images: int
    body: bytes = b""
    lag_ms: float = 0.0


def make_body(path: str, files: Sequence[bytes] | None = None, raw: bytes | None = None, content_type: str = "image/png",
              host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Body:
    """A POST as bytes: ``files`` as a multipart form (one part named ``file`` each), or one ``raw`` body."""
    import httpx

    extra = dict(headers or {})
    if files is not None:
        req = httpx.Request("POST", f"http://{host}{path}", files=[("file", (f"{k}.png", f, "image/png")) for k, f in enumerate(files)],
                            headers=extra)
        n = len(files)
    else:
        req = httpx.Request("POST", f"http://{host}{path}", content=raw, headers={"content-type": content_type, **extra})
        n = 1
    body = req.read()
    lines = [f"POST {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() not in ("host", "content-length")]
    lines.append(f"content-length: {len(body)}")
    return Body(("\r\n".join(lines) + "\r\n\r\n").encode() + body, n)


class Connection:
    """One keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def run(coro: Callable[[], Any]) -> Any:
    """Run a coroutine function on uvloop when it is installed (it is, with the serve extra), with
    this process's garbage collector off meanwhile: the benchmarks' client process holds torch and
    a network, so a full collection stops it for ~150 ms (timed with ``gc.callbacks``: two during
    one quick bursty run's traces), and every request in flight would be counted that much late
    although the server had answered in time (:mod:`snnet.deploy.heap` says the same of servers)."""
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    enabled = gc.isenabled()
    gc.disable()
    try:
        return run_loop(coro())
    finally:
        if enabled:
            gc.enable()


async def closed_loop(host: str, port: int, bodies: Sequence[Body], clients: int, seconds: float,
                      warmup: float = 1.0, timeout: float = 120.0) -> list[Result]:
    """Each of ``clients`` connections sends the next request when the last is answered, for
    ``warmup`` + ``seconds``; the results of the last ``seconds`` (t from their start). A request not
    answered within ``timeout`` s is a miss (status 0) on a new connection; a server that no longer takes
    connections ends the run with a :class:`~snnet.errors.ServeError` (every connection closed)."""
    from ..errors import ServeError

    conns: list[Connection] = []
    results: list[Result] = []

    async def loop(k: int, conn: Connection) -> None:
        i = k
        while (now := time.perf_counter()) < end:
            body = bodies[i % len(bodies)]
            try:
                status, data = await asyncio.wait_for(conn.send(body.raw), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                status, data = 0, b""
                conn.close()
                try:
                    conn = conns[k] = await Connection.open(host, port)  # in the list, so that it is closed at the end
                except OSError as e:  # the server is gone: a traceback from inside gather, the other connections left open
                    raise ServeError(f"the server at {host}:{port} no longer takes connections ({e.strerror or e}): "
                                     "it stopped or crashed during the load") from e
            done = time.perf_counter()
            if now >= start:
                results.append(Result(now - start, (done - now) * 1e3, status, body.images, data))
            i += clients

    try:
        for _ in range(clients):
            conns.append(await Connection.open(host, port))
        t0 = time.perf_counter()
        start, end = t0 + warmup, t0 + warmup + seconds
        await asyncio.gather(*(loop(k, c) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
    return results


async def open_loop(host: str, port: int, bodies: Sequence[Body], times: Sequence[float], timeout: float,
                    max_connections: int = 512, keep_body: bool = True) -> list[Result]:
    """Send ``bodies[k % len]`` at ``times[k]`` seconds from the start, each on an idle connection
    (a new one if none is idle, up to ``max_connections``; past that the request is not sent:
    status -1). A request not answered within ``timeout`` s is a miss (status 0). An idle connection
    the server closed meanwhile (keep-alive expiry: nothing of an answer came) is replaced and the
    request sent again, once, as HTTP clients do; a connection closed mid-answer is a miss. Latencies
    are timed from each request's arrival time in ``times``, so a generator that falls behind its
    schedule adds its delay to them (each result's ``lag_ms`` says how much) instead of hiding it."""
    idle: list[Connection] = []
    opened = 0
    results: list[Result] = []
    t0 = time.perf_counter()

    async def exchange(conn: Connection | None, raw: bytes) -> tuple[Connection, int, bytes]:
        """Send on ``conn`` (an idle one) or a new connection (None: its place in ``opened`` was taken
        when the request was sent); a connection that fails is closed here and its place given back."""
        nonlocal opened
        if conn is not None:
            try:
                return (conn, *await conn.send(raw))
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                    opened -= 1
                    raise  # the server closed it mid-answer: that is the server's doing
                # closed before a byte of the answer: the server ended an idle keep-alive connection
                # (uvicorn does after 5 s) while it sat in the pool; as HTTP clients do, send it again,
                # once, on a new connection (in its place), within the same timeout
            except BaseException:
                conn.close()
                opened -= 1
                raise
        fresh = None
        try:
            fresh = await Connection.open(host, port)
            return (fresh, *await fresh.send(raw))
        except BaseException:
            if fresh is not None:
                fresh.close()
            opened -= 1
            raise

    async def one(k: int, t: float, conn: Connection | None) -> None:
        body, due = bodies[k % len(bodies)], t0 + t
        lag = time.perf_counter() - due  # the generator's own delay (its loop busy, a burst sent in turn)
        try:
            conn, status, data = await asyncio.wait_for(exchange(conn, body.raw), timeout)
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            status, data = 0, b""
        # timed from when it was due, not from when it went out: a late send is the request's wait too
        results.append(Result(t, (time.perf_counter() - due) * 1e3, status, body.images, data if keep_body else b"", lag * 1e3))

    tasks = []
    for k, t in enumerate(times):
        delay = t0 + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # the connection is taken (or its place counted) here, not when the task first runs: the tasks of
        # a burst (arrivals due at once) all start after this loop next sleeps, and each would have
        # found the same idle connection, or opened one of its own past max_connections
        conn = idle.pop() if idle else None
        if conn is None:
            if opened >= max_connections:
                results.append(Result(t, 0.0, -1, bodies[k % len(bodies)].images))
                continue
            opened += 1
        tasks.append(asyncio.create_task(one(k, t, conn)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return sorted(results, key=lambda r: r.t)


# ============================================================================== traces


def gamma_times(rate: float, cv2: float, seconds: float, seed: int = 0) -> list[float]:
    """Arrival times in ``[0, seconds)`` with Gamma-distributed gaps of mean ``1/rate`` and squared
    coefficient of variation ``cv2`` (1: Poisson; larger: burstier, as SuperServe's traces)."""
    if not (rate > 0 and cv2 > 0):
        raise ValueError(f"rate and cv2 must be > 0, not {rate} and {cv2}")
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.gammavariate(1.0 / cv2, cv2 / rate)
        if t >= seconds:
            return out
        out.append(t)


def ramp_rate(t: float, low: float, peak: float, seconds: float) -> float:
    """The rate at time ``t`` of a ramp that climbs linearly from ``low`` to ``peak`` at mid-trace and falls back."""
    return low + (peak - low) * (1 - abs(2 * t / seconds - 1))


def ramp_times(low: float, peak: float, seconds: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process whose rate follows :func:`ramp_rate` (drawn by thinning)."""
    if not (low >= 0 and peak >= 0 and max(low, peak) > 0 and math.isfinite(low) and math.isfinite(peak)):
        # as gamma_times: a ValueError the callers turn into a message (a zero rate divided by zero below)
        raise ValueError(f"the ramp's rates must be >= 0 and finite, one of them > 0, not {low} and {peak}")
    rng = random.Random(seed)
    top = max(low, peak)  # candidates at the highest rate of the trace (its start and end when peak < low)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(top)
        if t >= seconds:
            return out
        if rng.random() < ramp_rate(t, low, peak, seconds) / top:
            out.append(t)


TRACES = ("gamma-cv1", "gamma-cv4", "gamma-cv8", "ramp")  # the bursty benchmark's traces, in its order


def trace(name: str, capacity: float, seconds: float, rate_x: float = 1.3, ramp_peak: float = 2.5,
          seed: int = 0) -> tuple[list[float], Callable[[float], float]]:
    """Arrival times of the trace called ``name`` and its mean rate over time, for a server whose
    largest anchor answers ``capacity`` requests/s: ``gamma-cvX`` (Gamma gaps of squared
    coefficient of variation X at ``rate_x`` x capacity) or ``ramp`` (0.2 x capacity up to
    ``ramp_peak`` x capacity at mid-trace and back). ValueError for another name."""
    if name.startswith("gamma-cv"):
        try:
            cv2 = float(name[len("gamma-cv"):])
        except ValueError:
            raise ValueError(f"unknown trace {name!r}: gamma-cv<number> or ramp") from None
        mean = rate_x * capacity
        return gamma_times(mean, cv2, seconds, seed), lambda t: mean
    if name == "ramp":
        low, peak = 0.2 * capacity, ramp_peak * capacity
        return ramp_times(low, peak, seconds, seed), lambda t: ramp_rate(t, low, peak, seconds)
    raise ValueError(f"unknown trace {name!r}: gamma-cv<number> or ramp")


# ============================================================================== request images


def fmnist_pngs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` Fashion-MNIST test images as PNG bytes (what a client would upload)."""
    import io

    from PIL import Image

    from ..data import FashionMNIST

    raw = FashionMNIST(split="test").images[:, 0].numpy()
    out = []
    for k in random.Random(seed).sample(range(len(raw)), n):
        buf = io.BytesIO()
        Image.fromarray(raw[k]).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def synthetic_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of smooth random colour fields of ``size`` (H, W): for timing a network whose
    data is not here (latency does not depend on what the picture shows)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize(size[::-1], Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ============================================================================== a server to measure


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``snnet serve ARGS`` in a subprocess on a free local port, with an admin token of its own.

    Use as a context manager: it waits until ``/health`` answers 200 (or the process exits) and
    stops the server (SIGTERM, then SIGKILL after a minute) on the way out."""

    def __init__(self, args: Sequence[str], start_timeout: float = 600.0) -> None:
        self.args, self.start_timeout = list(args), start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "loadgen-" + os.urandom(16).hex()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "snnet", "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, SNNET_ADMIN_TOKEN=self.token), stdout=subprocess.DEVNULL)
        try:
            wait_ready(self.url, self.proc, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/health", timeout=60).json()

    def put_stitch(self, setting: dict[str, Any]) -> dict[str, Any]:
        """``PUT /stitch`` with the token: ``{"stitch": id}`` pins, ``{"stitch": "auto", "policy": ...}`` frees."""
        import httpx

        r = httpx.put(self.url + "/stitch", json=setting, headers={"authorization": f"Bearer {self.token}"}, timeout=60)
        r.raise_for_status()
        return r.json()

    def stitch(self) -> dict[str, Any]:
        """``GET /stitch``: the policy's state (its stitch, mode and ``slowdown``, measured batch time over the table's)."""
        import httpx

        return httpx.get(self.url + "/stitch", timeout=60).json()

    def wait_idle(self, seconds: float = 120) -> None:
        """Until nothing is queued or held (what an earlier run left has been answered)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            h = self.health()
            if h["queue"] == 0 and h["held"] == 0:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600, path: str = "/health") -> None:
    """Until ``url + path`` answers 200; refuses when ``proc`` exits first or ``timeout`` s pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it answered {path}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {path} within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within ``grace`` s."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
