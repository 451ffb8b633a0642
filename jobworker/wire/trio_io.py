"""The thin Trio I/O that drives the wire core, the same for the server and the client.

- :class:`Writer`: the only task that sends on a connection's byte stream. Queueing frames
  is synchronous (h2 buffers them) and ``kick()`` is synchronous too, so it is safe
  anywhere, ``finally`` blocks under cancellation included; that is how a cancelled call's
  RST_STREAM or a handler's trailers get out. Senders ``await wait_writable()`` first.
- :class:`FlowGates`: the window-update fan-out. A sender blocked on a stream's window
  waits on its gate; a WINDOW_UPDATE for the stream opens that gate, one for the
  connection (stream 0) opens them all.
- :class:`MessageSender`: one message through flow control and the writer, the one path
  both sides send by.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import trio

from jobworker.wire.core import Outbound, OutgoingMessage, send_step

__all__ = ["FlowGates", "MessageSender", "Writer"]


class Writer:
    """Sends what the connection owes its socket, one ``send`` at a time.

    ``run()`` returns once ``close()`` was called and everything queued is sent; a failing
    ``send`` raises out of ``run()`` (the owner decides what a broken connection means).
    """

    def __init__(self, outbound: Outbound, send: Callable[[bytes], Awaitable[object]]) -> None:
        self._outbound = outbound
        self._send = send
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._closing = False
        self._done = False

    def kick(self) -> None:
        """Have the writer send whatever is queued. Sync: never checkpoints."""
        self._wake.set()

    def close(self) -> None:
        """Send what is queued, then end ``run()``. Sync."""
        self._closing = True
        self._wake.set()

    async def wait_writable(self) -> None:
        """Return once a sender may queue more (see Outbound.writable), or once the writer
        has ended (nothing more will be sent: the sender finds out from its call). Cancellable."""
        while not self._done and not self._outbound.writable():
            await self._progress.wait()

    async def run(self) -> None:
        try:
            await self._write()
        finally:
            self._done = True
            self._progress.set()

    async def _write(self) -> None:
        outbound = self._outbound
        while True:
            data = outbound.take()
            if data:
                try:
                    # A bytearray h2 will not touch again: every stream's send takes any
                    # bytes-like object, so it goes out without a copy.
                    await self._send(cast("bytes", data))
                finally:
                    outbound.sent()
                    self._progress.set()
                    self._progress = trio.Event()
            elif self._closing:
                return
            else:
                await self._wake.wait()
                self._wake = trio.Event()


class FlowGates:
    """Wakeups for the senders waiting on flow control, per stream."""

    def __init__(self) -> None:
        self._gates: dict[int, trio.Event] = {}

    async def wait(self, stream_id: int) -> None:
        """Wait for the next window update of ``stream_id`` or of the connection."""
        gate = self._gates.get(stream_id)
        if gate is None:
            gate = self._gates[stream_id] = trio.Event()
        await gate.wait()

    def opened(self, stream_id: int) -> None:
        """A WINDOW_UPDATE arrived for ``stream_id`` (0: the connection, every stream)."""
        if stream_id == 0:
            gates, self._gates = self._gates, {}
            for gate in gates.values():
                gate.set()
        elif stream_id in self._gates:
            self._gates.pop(stream_id).set()

    def open_all(self) -> None:
        """Wake every waiter (new SETTINGS, or the connection is gone: they look again)."""
        self.opened(0)


class MessageSender:
    """Sends gRPC messages on one connection's streams: the one path both sides send by."""

    def __init__(
        self, connection: object, writer: Writer, gates: FlowGates, max_message_bytes: int
    ) -> None:
        self._connection = connection
        self._writer = writer
        self._gates = gates
        self._max_message_bytes = max_message_bytes

    async def send(
        self, stream_id: int, payload: bytes, *, abandoned: Callable[[], bool] = lambda: False
    ) -> bool:
        """Frame ``payload`` as one gRPC message and hand it to h2 as flow control allows.

        Waits while the writer holds too much (``wait_writable``) and while the stream's
        window is shut. Returns False if ``abandoned()`` turned true on the way (the call
        ended or the connection failed), True once all of it is queued. Raises h2's
        StreamClosedError for a stream reset meanwhile.
        """
        buffer = OutgoingMessage(payload, self._max_message_bytes)
        writer = self._writer
        while buffer:
            if abandoned():
                return False
            await writer.wait_writable()
            if abandoned():
                return False
            if not send_step(self._connection, stream_id, buffer):
                await self._gates.wait(stream_id)
                continue
            writer.kick()
        return True
