"""The accept loop: TCP on the one --listen address, a bounded TLS handshake, a connection cap,
and one task per connection, all owned by ``Listener.serve``'s nursery."""

from __future__ import annotations

import collections
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
import trio

from jobworker import logtext
from jobworker.server.janitor import MemoryJanitor
from jobworker.server.tls import Peer, handshake

log = logging.getLogger(__name__)

# Errors accept() raises when the process or system is out of something; trio's own
# serve_listeners waits and retries on the same set.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_SLEEP_S = 0.1
REFUSAL_LOG_INTERVAL_S = 5.0  # at most one "too many connections" line per interval

ConnectionHandlerFn = Callable[[Peer, trio.Event, str], Awaitable[None]]


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remote(stream: anyio.abc.SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    if isinstance(address, tuple):
        return format_address(str(address[0]), int(address[1]))
    return str(address)


class Listener:
    """Serves connections from the ``tcp`` listeners (one per address of --listen) until
    ``shutdown()``.

    Each accepted connection runs in its own task: TLS handshake within
    ``handshake_timeout`` (a failure is one log line), then ``handler(peer, closing,
    remote)``. Beyond ``max_connections`` open connections (handshaking ones included) a new
    one is closed at once. On cancellation every connection task is cancelled and its
    socket closed.
    """

    def __init__(
        self,
        tcp: Sequence[anyio.abc.SocketListener],
        ssl_context: ssl.SSLContext,
        handler: ConnectionHandlerFn,
        *,
        handshake_timeout: float,
        max_connections: int,
    ) -> None:
        self._tcp = tcp
        self._ssl_context = ssl_context
        self._handler = handler
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._accept_scope = trio.CancelScope()
        self.closing = trio.Event()  # set by shutdown(): connections close gracefully
        self.connections = 0
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL_S
        self._refused_since_log = 0
        self.janitor = MemoryJanitor()
        self.handshake_failures: collections.Counter[str] = collections.Counter()  # by kind

    @property
    def address(self) -> tuple[str, int]:
        """The first listening address (host, port): the real port when 0 was asked."""
        address = self._tcp[0].extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
        assert isinstance(address, tuple)
        return str(address[0]), int(address[1])

    def replace_ssl_context(self, context: ssl.SSLContext) -> None:
        """Use ``context`` for the handshakes of connections accepted from now on; those
        already established keep the one they were made with."""
        self._ssl_context = context

    def shutdown(self) -> None:
        """Stop accepting and ask every connection to close (RPCs end with UNAVAILABLE).
        ``serve`` returns once the last connection is gone."""
        self.closing.set()
        self._accept_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until shutdown(); then wait for the connections. Closes the TCP listeners."""
        try:
            async with trio.open_nursery() as nursery:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for tcp in self._tcp:
                            accepting.start_soon(self._accept_loop, tcp, nursery)
                        # Lives as long as accepting does (memory after bursts: janitor.py).
                        await accepting.start(self.janitor.run)
                        task_status.started()
                await self._close_tcp()  # refuse new connections during the drain
        finally:
            with trio.CancelScope(shield=True):
                await self._close_tcp()

    async def _close_tcp(self) -> None:
        for tcp in self._tcp:
            await anyio.aclose_forcefully(tcp)

    async def _accept_loop(self, tcp: anyio.abc.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                transport = await tcp.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed: %s; retrying", exc.strerror)  # noqa: TRY400
                await trio.sleep(ACCEPT_RETRY_SLEEP_S)
                continue
            if self.connections >= self._max_connections:
                await self._refuse(transport)
                continue
            self.connections += 1
            nursery.start_soon(self._connection, transport)

    async def _refuse(self, transport: anyio.abc.SocketStream) -> None:
        self._refused_since_log += 1
        now = trio.current_time()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "connection limit (%d) reached: refused %d connection(s)",
                self._max_connections,
                self._refused_since_log,
            )
            self._last_refusal_log = now
            self._refused_since_log = 0
        await anyio.aclose_forcefully(transport)

    async def _connection(self, transport: anyio.abc.SocketStream) -> None:
        remote = _remote(transport)
        try:
            peer = await handshake(
                transport,
                self._ssl_context,
                self._handshake_timeout,
                remote,
                self.handshake_failures,
            )
            if peer is None:
                return
            log.debug(
                "connection from %s: %s (role %s)",
                remote,
                logtext.field(peer.identity.name),
                logtext.field(peer.identity.role_label),
            )
            await self._handler(peer, self.closing, remote)
        except Exception:  # the connection edge: nothing may take the listener down
            log.exception("unexpected error serving the connection from %s", remote)
        finally:
            self.connections -= 1
            self.janitor.note_churn()
