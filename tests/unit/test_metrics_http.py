"""The /metrics responder on its own, in-process over real sockets: what a client that is
not a scraper can hold, and for how long."""

from __future__ import annotations

import pytest
import trio

from jobworker.server import metrics_http
from jobworker.server.metrics_http import MetricsServer, open_metrics_server

BODY = b"jobworker_up 1\n"


async def _read_all(stream: trio.SocketStream) -> bytes:
    reply = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply


async def _closed_without_answer(stream: trio.SocketStream) -> bool:
    """Send a request; True if the server closes (FIN or RST) without a byte of answer."""
    try:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        return await _read_all(stream) == b""
    except trio.BrokenResourceError:  # closed with our request unread: RST
        return True


async def _serving(nursery: trio.Nursery) -> MetricsServer:
    server = await open_metrics_server("127.0.0.1", 0, lambda: BODY)
    nursery.start_soon(server.serve)
    return server


async def test_a_scrape_gets_the_rendered_text_and_the_connection_closes() -> None:
    async with trio.open_nursery() as nursery:
        server = await _serving(nursery)
        stream = await trio.open_tcp_stream(*server.address)
        await stream.send_all(b"GET /metrics?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
        reply = await _read_all(stream)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 15" in head
        assert body == BODY
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_head_has_no_body() -> None:
    async with trio.open_nursery() as nursery:
        server = await _serving(nursery)
        stream = await trio.open_tcp_stream(*server.address)
        await stream.send_all(b"HEAD /metrics HTTP/1.0\r\n\r\n")
        reply = await _read_all(stream)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert reply.endswith(b"\r\n\r\n")
        nursery.cancel_scope.cancel()


async def test_a_client_that_never_finishes_its_request_is_closed_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_http, "REQUEST_DEADLINE_S", 0.3)
    async with trio.open_nursery() as nursery:
        server = await _serving(nursery)
        stream = await trio.open_tcp_stream(*server.address)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost")  # and nothing more
        assert await _read_all(stream) == b""  # closed without an answer
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_are_closed_at_accept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 2)
    async with trio.open_nursery() as nursery:
        server = await _serving(nursery)
        held = [await trio.open_tcp_stream(*server.address) for _ in range(2)]
        with trio.fail_after(5):
            while server.connections < 2:
                await trio.sleep(0.01)
        extra = await trio.open_tcp_stream(*server.address)
        assert await _closed_without_answer(extra)
        for stream in held:  # the held ones are still served
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert (await _read_all(stream)).startswith(b"HTTP/1.1 200 OK")
        nursery.cancel_scope.cancel()


async def test_a_failing_render_is_a_500_without_details() -> None:
    def broken() -> bytes:
        raise RuntimeError("secret internals")

    async with trio.open_nursery() as nursery:
        server = await open_metrics_server("127.0.0.1", 0, broken)
        nursery.start_soon(server.serve)
        stream = await trio.open_tcp_stream(*server.address)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        reply = await _read_all(stream)
        assert reply.startswith(b"HTTP/1.1 500 ")
        assert b"secret" not in reply
        nursery.cancel_scope.cancel()
