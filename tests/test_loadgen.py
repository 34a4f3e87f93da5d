"""The load generator against a raw asyncio server whose behaviour the test sets: keep-alive
connections the server closes while they sit idle are not counted as the server's misses."""

from __future__ import annotations

import asyncio

from snnet.deploy import loadgen


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """Read one request (head and body) from a client; False once it has closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = next((int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:"), 0)
    await reader.readexactly(length)
    return True


async def _serve_and_send(close_after_answer: bool, cut_mid_answer: bool) -> tuple[list[loadgen.Result], int]:
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while await _read_request(reader):
            if cut_mid_answer:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")  # 2 of 10 bytes, then gone
                await writer.drain()
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if close_after_answer:  # as a server whose keep-alive timeout ends the idle connection
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = loadgen.make_body("/predict", raw=b"x" * 10)
    async with server:
        results = await loadgen.open_loop("127.0.0.1", port, [body], [0.0, 0.2, 0.4], timeout=5.0)
    return results, accepted


def test_an_idle_connection_the_server_closed_is_replaced_not_counted_as_a_miss() -> None:
    results, accepted = asyncio.run(_serve_and_send(close_after_answer=True, cut_mid_answer=False))
    assert [r.status for r in results] == [200, 200, 200] and [r.body for r in results] == [b"ok"] * 3
    assert accepted == 3  # each later request found its pooled connection closed and opened another


def test_keep_alive_connections_are_reused_and_a_cut_answer_is_a_miss() -> None:
    results, accepted = asyncio.run(_serve_and_send(close_after_answer=False, cut_mid_answer=False))
    assert [r.status for r in results] == [200, 200, 200] and accepted == 1
    results, _ = asyncio.run(_serve_and_send(close_after_answer=False, cut_mid_answer=True))
    assert [r.status for r in results] == [0, 0, 0]


def test_the_client_runs_without_its_garbage_collector_and_gives_it_back() -> None:
    # a full collection in the benchmarks' client (torch and a network loaded) stops it for 100-150 ms:
    # every request in flight would be counted that much late (snnet.deploy.loadgen.run)
    import gc

    async def inside() -> bool:
        return gc.isenabled()

    assert gc.isenabled()
    assert loadgen.run(inside) is False
    assert gc.isenabled()
    gc.disable()
    try:
        loadgen.run(inside)
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_a_ramp_whose_peak_is_under_its_low_rate_dips_and_comes_back() -> None:
    # ramp_rate falls from `low` to `peak` at mid-trace and back when peak < low (bench_serve --ramp-peak under 0.2).
    # The thinning drew candidates at the peak rate, never more: every second came at the peak rate, a flat trace
    times = loadgen.ramp_times(100.0, 20.0, 20.0, seed=0)
    first = sum(1 for t in times if t < 2.0)  # the rate there is 92-100 a second
    middle = sum(1 for t in times if 9.0 <= t < 11.0)  # about 20-28
    assert 160 < first < 230 and 25 < middle < 70, (first, middle)
    # the usual ramp (low to a higher peak) is drawn as before
    up = loadgen.ramp_times(20.0, 100.0, 20.0, seed=0)
    assert sum(1 for t in up if t < 2.0) < 70 < 160 < sum(1 for t in up if 9.0 <= t < 11.0)


def test_a_burst_opens_no_more_than_max_connections_and_the_rest_are_not_sent() -> None:
    # arrivals due at once were all scheduled before any of their tasks ran, and each task then opened a
    # connection of its own: 20 connections for max_connections=4, none of the requests counted as not sent
    accepted = 0

    async def main() -> list[loadgen.Result]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next((int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:"), 0)
                    await reader.readexactly(length)
                    await asyncio.sleep(0.2)  # busy: the burst cannot reuse an answered connection
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await loadgen.open_loop("127.0.0.1", port, [loadgen.make_body("/predict", raw=b"x")], [0.0] * 10,
                                           timeout=5.0, max_connections=4)

    results = asyncio.run(main())
    assert accepted == 4
    assert sorted(r.status for r in results) == [-1] * 6 + [200] * 4


def test_closed_loop_closes_the_connections_it_opened_in_place_of_failed_ones(monkeypatch) -> None:
    # a connection the server closed was replaced, but the replacement was left out of the list closed at
    # the end: the last one of every client stayed open (a socket per client leaked each run)
    opened: list[loadgen.Connection] = []
    closed: list[loadgen.Connection] = []
    real_open, real_close = loadgen.Connection.open.__func__, loadgen.Connection.close  # type: ignore[attr-defined]

    async def counted_open(cls: type, host: str, port: int) -> loadgen.Connection:
        opened.append(conn := await real_open(cls, host, port))
        return conn

    def counted_close(self: loadgen.Connection) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(loadgen.Connection, "open", classmethod(counted_open))
    monkeypatch.setattr(loadgen.Connection, "close", counted_close)

    async def main() -> list[loadgen.Result]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()  # one answer a connection, then closed

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await loadgen.closed_loop("127.0.0.1", port, [loadgen.make_body("/predict")], 2, 0.2, warmup=0.0)

    results = asyncio.run(main())
    assert {r.status for r in results} == {0, 200} and len(opened) > 2
    assert all(c in closed for c in opened)


def test_a_ramp_at_no_rate_is_refused_with_a_value_error_as_a_gamma_trace_is() -> None:
    # bench_serve.py turns trace()'s ValueError into a message; a server that answered nothing in the capacity
    # probe (capacity 0) gave the ramp a ZeroDivisionError from the thinning instead (a traceback)
    import pytest

    with pytest.raises(ValueError, match="ramp's rates"):
        loadgen.trace("ramp", 0.0, 5.0)
    with pytest.raises(ValueError, match="ramp's rates"):
        loadgen.ramp_times(-1.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="must be > 0"):
        loadgen.trace("gamma-cv1", 0.0, 5.0)
    assert loadgen.ramp_times(0.0, 50.0, 2.0)  # a ramp from nothing is fine


def test_closed_loop_against_a_server_that_hangs_or_goes_misses_and_then_stops_in_one_error() -> None:
    """A server that never answers held a closed loop for ever (no timeout); one that stopped taking connections
    made the reconnect's OSError escape from inside gather, the other connections left open."""
    import pytest

    from snnet.errors import ServeError

    async def main(answer: bool) -> list[loadgen.Result]:
        server: asyncio.AbstractServer | None = None

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                if not answer:
                    await asyncio.sleep(30)  # hangs
                server.close()  # answers nothing and takes no more connections: gone
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return await loadgen.closed_loop("127.0.0.1", port, [loadgen.make_body("/predict")], 1, 0.6 if not answer else 5.0,
                                         warmup=0.0, timeout=0.2)

    hung = asyncio.run(main(answer=False))
    assert hung and {r.status for r in hung} == {0} and all(150 <= r.ms < 2000 for r in hung)
    with pytest.raises(ServeError, match="no longer takes connections"):
        asyncio.run(main(answer=True))


def test_open_loop_latency_counts_from_the_scheduled_arrival_when_the_generator_falls_behind() -> None:
    """A request due while the generator's loop is held (0.3 s here) is sent late; its latency counts the
    delay (coordinated omission: timed from its send, the late request looked as fast as the server's answer)."""
    import time

    async def main() -> list[loadgen.Result]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await _read_request(reader):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            asyncio.get_running_loop().call_later(0.15, time.sleep, 0.3)  # the generator's loop held from 0.15 to 0.45 s
            return await loadgen.open_loop("127.0.0.1", port, [loadgen.make_body("/predict", raw=b"x")], [0.0, 0.2], timeout=5.0)

    first, late = asyncio.run(main())
    assert first.status == late.status == 200 and late.t == 0.2
    assert late.lag_ms >= 200 and late.ms >= late.lag_ms  # sent ~0.25 s late, and its latency says so
    assert first.lag_ms < 100
