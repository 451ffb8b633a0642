"""A tiny HTTP/1.1 responder for ``GET /metrics`` (Prometheus text exposition), on Trio.

prometheus_client's own server runs in a thread of its own, outside the server's nursery
and its shutdown; this one is a task of the server's root nursery like everything else.
It answers one request per connection (``Connection: close``: scrapers reconnect each
time, a few times a minute), and bounds what a client can hold: a request head of at
most MAX_REQUEST_BYTES, the whole exchange within REQUEST_DEADLINE_S, at most
MAX_CONNECTIONS connections at once (the excess is closed at accept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from jobworker.server.listener import format_address

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
MAX_REQUEST_BYTES = 8 * 1024  # a scrape is a request line and a few headers
REQUEST_DEADLINE_S = 10.0  # Prometheus' default scrape timeout is 10 s too
MAX_CONNECTIONS = 16  # scrapers are few; more at once is a misbehaving client
CLOSE_TIMEOUT_S = 1.0
LINGER_S = 1.0  # after the response: time for the client to close first
LINGER_MAX_BYTES = 64 * 1024  # input discarded after the response, at most
RECEIVE_CHUNK = 4096

Render = Callable[[], bytes]


class MetricsListenError(Exception):
    """Raised when --metrics-listen cannot be bound."""


class _BadRequest(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _response(status: str, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    headers = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    )
    if status.startswith("405"):
        headers += "Allow: GET, HEAD\r\n"
    return (headers + "\r\n").encode() + (b"" if head else body)


def _text(status: str, message: str) -> bytes:
    return _response(status, f"{message}\n".encode(), "text/plain; charset=utf-8")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers (without the blank line); None if the client closed
    before sending anything."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            raise _BadRequest("431 Request Header Fields Too Large", "request too large")
        chunk = await stream.receive_some(RECEIVE_CHUNK)
        if not chunk:
            if data:
                raise _BadRequest("400 Bad Request", "incomplete request")
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0]
    if len(head) > MAX_REQUEST_BYTES:
        raise _BadRequest("431 Request Header Fields Too Large", "request too large")
    return head


def _answer(head: bytes, render: Render) -> bytes:
    """The response to one request head."""
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("400 Bad Request", "malformed request line")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _text("405 Method Not Allowed", "only GET and HEAD")
    if target != METRICS_PATH.encode():
        return _text("404 Not Found", f"not found: metrics are at {METRICS_PATH}")
    try:
        body = render()
    except Exception:  # a scrape must not take the server down
        log.exception("cannot render the metrics")
        return _text("500 Internal Server Error", "internal error")
    return _response("200 OK", body, CONTENT_TYPE, head=method == b"HEAD")


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then discard what the client still sends (bounded) until it closes.

    Closing a socket with unread input sends RST, and a client that gets RST may lose the
    response it has not read yet (an error reply to an oversized request, typically)."""
    await stream.send_eof()
    discarded = 0
    with trio.move_on_after(LINGER_S):
        while discarded < LINGER_MAX_BYTES:
            chunk = await stream.receive_some(RECEIVE_CHUNK)
            if not chunk:
                break
            discarded += len(chunk)


class MetricsServer:
    """Serves ``render()`` at /metrics on the given listeners until cancelled."""

    def __init__(self, listeners: list[trio.SocketListener], render: Render) -> None:
        self._listeners = listeners
        self._render = render
        self.connections = 0

    @property
    def address(self) -> tuple[str, int]:
        """The first listening address (host, port)."""
        host, port = self._listeners[0].socket.getsockname()[:2]
        return str(host), int(port)

    async def serve(self) -> None:
        """Accept and answer until cancelled; then every connection is closed."""
        try:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                for listener in self._listeners:
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors: wait, as the gRPC listener does
                log.warning("metrics: accept failed: %s", exc.strerror)
                await trio.sleep(0.1)
                continue
            if self.connections >= MAX_CONNECTIONS:
                await trio.aclose_forcefully(stream)
                continue
            self.connections += 1
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_DEADLINE_S) as scope:
                try:
                    head = await _read_head(stream)
                    response = None if head is None else _answer(head, self._render)
                except _BadRequest as bad:
                    response = _text(bad.status, bad.message)
                if response is not None:
                    await stream.send_all(response)
                    await _linger(stream)
            if scope.cancelled_caught:
                log.info("metrics: a request did not complete within %gs", REQUEST_DEADLINE_S)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the scraper went away
        finally:
            self.connections -= 1
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await stream.aclose()


async def open_metrics_server(host: str, port: int, render: Render) -> MetricsServer:
    """Bind ``host:port`` (port 0 picks one). Raises MetricsListenError."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = format_address(host, port)
        raise MetricsListenError(
            f"cannot listen for metrics on {where}: {exc.strerror or exc}"
        ) from None
    if port == 0:  # each address would get a port of its own: keep one, the one printed
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    return MetricsServer(listeners, render)
