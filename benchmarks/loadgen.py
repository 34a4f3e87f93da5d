"""A lean HTTP/1.1 load generator for the serving benchmarks (closed loop and open loop).

The client shares this machine's two cores with the server it measures, so it must cost as
little as possible per request: request bytes are built once (by httpx, as a client would send
them), each connection is a keep-alive asyncio stream (on uvloop), and a response is read as a
status line, headers and ``Content-Length`` bytes. httpx costs several times more CPU per
request, and on two cores that CPU is taken from the server being measured.

* :func:`closed_loop` — ``clients`` connections, each sending its next request as soon as the
  last one is answered: the server's capacity.
* :func:`open_loop` — requests sent at given times whatever the server does (arrivals do not
  wait for answers): what a server sees from many independent users. A request that is not
  answered within ``timeout`` counts as a miss, and its connection is closed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Body:
    """One request, ready to send: the whole HTTP/1.1 request as bytes, and how many images it carries."""

    raw: bytes
    images: int


@dataclass(frozen=True)
class Result:
    """One request: when it was sent (s from the start), its latency, status (0: transport error or
    timeout, -1: not sent, the generator's connection bound was hit) and the response body."""

    t: float
    ms: float
    status: int
    images: int
    body: bytes = b""


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


def run(coro: Callable[[], object]) -> object:
    """Run a coroutine function on uvloop when it is installed (it is, with the serve extra)."""
    try:
        import uvloop

        return uvloop.run(coro())  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro())  # type: ignore[arg-type]


async def closed_loop(host: str, port: int, bodies: Sequence[Body], clients: int, seconds: float,
                      warmup: float = 1.0) -> list[Result]:
    """Each of ``clients`` connections sends the next request when the last is answered, for
    ``warmup`` + ``seconds``; the results of the last ``seconds`` (t from their start)."""
    conns = [await Connection.open(host, port) for _ in range(clients)]
    results: list[Result] = []
    t0 = time.perf_counter()
    start, end = t0 + warmup, t0 + warmup + seconds

    async def loop(k: int, conn: Connection) -> None:
        i = k
        while (now := time.perf_counter()) < end:
            body = bodies[i % len(bodies)]
            try:
                status, data = await conn.send(body.raw)
            except (OSError, asyncio.IncompleteReadError):
                status, data = 0, b""
                conn.close()
                conn = await Connection.open(host, port)
            done = time.perf_counter()
            if now >= start:
                results.append(Result(now - start, (done - now) * 1e3, status, body.images, data))
            i += clients

    await asyncio.gather(*(loop(k, c) for k, c in enumerate(conns)))
    for c in conns:
        c.close()
    return results


async def open_loop(host: str, port: int, bodies: Sequence[Body], times: Sequence[float], timeout: float,
                    max_connections: int = 512, keep_body: bool = True) -> list[Result]:
    """Send ``bodies[k % len]`` at ``times[k]`` seconds from the start, each on an idle connection
    (a new one if none is idle, up to ``max_connections``; past that the request is not sent:
    status -1). A request not answered within ``timeout`` s is a miss (status 0)."""
    idle: list[Connection] = []
    opened = 0
    results: list[Result] = []
    t0 = time.perf_counter()

    async def one(k: int, sent: float) -> None:
        nonlocal opened
        body = bodies[k % len(bodies)]
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                opened += 1
                conn = await Connection.open(host, port)
            status, data = await asyncio.wait_for(conn.send(body.raw), timeout)
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            status, data = 0, b""
            if conn is not None:
                conn.close()
            opened -= 1
        results.append(Result(sent - t0, (time.perf_counter() - sent) * 1e3, status, body.images, data if keep_body else b""))

    tasks = []
    for k, t in enumerate(times):
        delay = t0 + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not idle and opened >= max_connections:
            results.append(Result(time.perf_counter() - t0, 0.0, -1, bodies[k % len(bodies)].images))
            continue
        tasks.append(asyncio.create_task(one(k, time.perf_counter())))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return sorted(results, key=lambda r: r.t)
