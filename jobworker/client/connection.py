"""One gRPC-over-HTTP/2 client connection on Trio, on purerpc's sans-IO core.

purerpc's own client (GRPCSocket/SocketWrapper) never sends RST_STREAM, never
closes its socket and leaves calls hanging when the server goes away. Here we
keep purerpc's protocol state machine (``GRPCConnection``: h2 + gRPC framing
and message parsing) and own the I/O ourselves:

- a writer task is the only sender on the TLS stream (a cancelled ``send_all``
  would break it), so queueing frames is synchronous and safe anywhere,
  including in ``finally`` blocks under cancellation: that is how a cancelled
  call's RST_STREAM(CANCEL) gets out;
- a reader task feeds h2 and routes events to calls; on EOF, a broken stream
  or a protocol error it fails the connection, which wakes every call in
  progress with ConnectionLost (or ConnectError before the connection was up);
- the connection counts as up once the server's first SETTINGS frame arrived:
  under TLS 1.3 a server that refuses our certificate says so only after our
  handshake has finished, so this is where that refusal is caught.

Both tasks are KI-protected so Ctrl+C is delivered to the caller's task, whose
cleanup then sends the RST_STREAM.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import trio
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import (
    MessageReceived,
    ResponseEnded,
    ResponseReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import MessageTooLargeError, StreamClosedError
from purerpc.grpclib.status import Status, StatusCode

from jobworker.client.address import ServerAddress
from jobworker.client.tls import tls_failure
from jobworker.errors import (
    SHUTDOWN_MESSAGE,
    ConnectError,
    ConnectionLost,
    RpcError,
    ServerShuttingDown,
)
from jobworker.wire.connection import WireConnection
from jobworker.wire.core import CLIENT_LIMITS, Outbound, apply_limits, initiate
from jobworker.wire.trio_io import FlowGates, MessageSender, Writer

log = logging.getLogger(__name__)

LIMITS = CLIENT_LIMITS  # a stream's receive window holds one maximal message
GRPC_TIMEOUT_MAX_DIGITS = 8  # the gRPC spec: TimeoutValue is at most 8 digits
USER_AGENT = "jobworker-client/0.1 purerpc/0.8.0"


class SettingsReceived:
    """The server sent SETTINGS: it accepted our TLS session and speaks HTTP/2."""


class StreamReset:
    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class StreamEnded:
    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class GoAway:
    def __init__(self, last_stream_id: int, error_code: int) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code


class _ClientProtocol(WireConnection):
    """purerpc's state machine, with the events its client silently drops turned into events."""

    def _set_h2_connection_local_settings(self) -> None:
        apply_limits(self.h2_connection, LIMITS, client_side=True)

    def initiate_connection(self) -> None:
        initiate(self.h2_connection, LIMITS)

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[object]:
        return [SettingsReceived()]

    def _stream_reset(self, event: h2.events.StreamReset) -> list[object]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamReset(event.stream_id, int(event.error_code))]

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[object]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamEnded(event.stream_id)]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[object]:
        return [GoAway(event.last_stream_id or 0, int(event.error_code))]

    def _data_received(self, event: h2.events.DataReceived) -> list[object]:
        if event.stream_id not in self.message_read_buffers:
            # DATA before response headers (purerpc would KeyError here): a stream error.
            self.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            self.h2_connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [StreamReset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
        events: list[object] = super()._data_received(event)
        return events

    def start_call(self, stream_id: int, authority: str, path: str, timeout: float | None) -> None:
        """Send the request headers (purerpc's start_request, with a valid grpc-timeout)."""
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc+proto"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", encode_grpc_timeout(timeout)))
        headers.append(("user-agent", USER_AGENT))
        self.h2_connection.send_headers(stream_id, headers, end_stream=False)

    def forget(self, stream_id: int) -> None:
        self.message_read_buffers.pop(stream_id, None)


def encode_grpc_timeout(seconds: float) -> str:
    """gRPC's grpc-timeout header value: the finest unit whose value fits in 8 digits.

    Rounded up, so the server never sees a shorter deadline than ours.
    """
    limit = 10**GRPC_TIMEOUT_MAX_DIGITS - 1
    seconds = max(seconds, 0.0)
    for unit, per_second in (("u", 1_000_000), ("m", 1_000), ("S", 1), ("M", 1 / 60)):
        value = math.ceil(seconds * per_second)
        if value <= limit:
            return f"{max(value, 1)}{unit}"
    return f"{min(limit, math.ceil(seconds / 3600))}H"


_RESET_CODES = {
    h2.errors.ErrorCodes.CANCEL: ("CANCELLED", "the server cancelled the call"),
    h2.errors.ErrorCodes.REFUSED_STREAM: ("UNAVAILABLE", "the server refused the call"),
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: ("RESOURCE_EXHAUSTED", "the server is overloaded"),
}


def _reset_error(error_code: int) -> RpcError:
    code_name, message = _RESET_CODES.get(
        error_code, ("INTERNAL", f"the server reset the call (HTTP/2 error {error_code})")
    )
    return RpcError(code_name, message)


class Call:
    """One RPC on the connection: send the request once, then read messages until the status.

    ``close()`` must be called when the caller is done (the owners in jobs.py do
    it in ``finally``): if the server has not finished the call, it queues
    RST_STREAM(CANCEL) so the server stops working on it.
    """

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self._status: Status | None = None
        self._failure: Callable[[], RpcError] | None = None
        self._changed = trio.Event()
        self._request_ended = False  # our END_STREAM is out: the stream is half-closed (local)
        self._closed = False
        # The server's custom text metadata: with its response headers, and with its status
        # (in a trailers-only response, all of it is trailers).
        self.initial_metadata: dict[str, str] = {}
        self.trailing_metadata: dict[str, str] = {}

    @property
    def finished(self) -> bool:
        """True once the server sent its status, reset the call, or the connection failed."""
        return self._status is not None or self._failure is not None

    async def send_request(self, payload: bytes) -> None:
        """Send the one request message and half-close, honouring the peer's flow control."""
        connection = self._connection
        try:
            sent = await connection.sender.send(
                self.stream_id,
                payload,
                # the server answered early (an error) or the connection died
                abandoned=lambda: self.finished,
            )
            if sent:
                connection.protocol.end_request(self.stream_id)
                self._request_ended = True
        except (StreamClosedError, h2.exceptions.StreamClosedError):
            return  # reset by the server meanwhile: receive_message() reports why
        except MessageTooLargeError:
            # The server's words for the same refusal, before a byte of it is sent.
            raise RpcError(
                "RESOURCE_EXHAUSTED",
                f"request message too large: {len(payload)} bytes"
                f" (limit {LIMITS.max_message_bytes})",
            ) from None
        finally:
            connection.flush()

    async def receive_message(self) -> bytes | None:
        """The next response message; None once the server ended the call with OK.

        Raises RpcError for a non-OK status, ConnectionLost if the connection
        dropped (after the messages that arrived before it). Cancellation leaves
        the call open: close() it.
        """
        while True:
            if self._messages:
                data, flow_controlled_length = self._messages.popleft()
                self._connection.acknowledge(self.stream_id, flow_controlled_length)
                return data
            if self._failure is not None:
                raise self._failure()
            if self._status is not None:
                code, message = self._status.status_code, self._status.status_message
                if code == StatusCode.OK:
                    return None
                if code == StatusCode.UNAVAILABLE and (
                    message == SHUTDOWN_MESSAGE or self._connection.closing_gracefully
                ):
                    raise ServerShuttingDown
                raise RpcError(code.name, message)
            await self._changed.wait()
            self._changed = trio.Event()

    def close(self) -> None:
        """Forget the call; if the stream is still open either way, reset it with CANCEL. Sync.

        (Open on our side too when the server answered before our request was all sent.)
        """
        if self._closed:
            return
        self._closed = True
        for _, flow_controlled_length in self._messages:
            self._connection.acknowledge(self.stream_id, flow_controlled_length)
        self._messages.clear()
        self._connection.release(self, cancel=not (self.finished and self._request_ended))

    # Called by the connection's reader task.
    def _wake(self) -> None:
        self._changed.set()

    def _deliver(self, data: bytes, flow_controlled_length: int) -> None:
        self._messages.append((data, flow_controlled_length))
        self._wake()

    def _started(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self.initial_metadata = _text_metadata(metadata)

    def _finish(self, status: Status, metadata: Iterable[tuple[str, str | bytes]] = ()) -> None:
        if not self.finished:
            self._status = status
            self.trailing_metadata = _text_metadata(metadata)
        self._wake()

    def _fail(self, failure: Callable[[], RpcError]) -> None:
        if not self.finished:
            self._failure = failure
        self._connection.gates.opened(self.stream_id)
        self._wake()


def _text_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Name -> value of the text entries (binary ``-bin`` ones are left out); the values of
    a name sent more than once joined with commas, as HTTP joins repeated fields."""
    found: dict[str, list[str]] = {}
    for name, value in metadata:
        if isinstance(value, str):
            found.setdefault(name, []).append(value)
    return {name: ",".join(values) for name, values in found.items()}


class Connection:
    """A client HTTP/2 connection over an established TLS stream.

    ``run_reader``/``run_writer`` are its two tasks (the session's nursery owns
    them). ``wait_ready`` returns once the server's SETTINGS arrived, or raises
    ConnectError. ``close_gracefully`` resets the calls still open, lets the
    writer send everything queued (those RST_STREAMs, and those of calls
    cancelled earlier) and stop; the session then cancels the tasks and closes
    the stream (TLS close_notify, then the socket).
    """

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        address: ServerAddress,
        client_cert: str | Path,
    ) -> None:
        self.stream = stream
        self.address = address
        self._client_cert = client_cert
        self.protocol = _ClientProtocol(
            GRPCConfiguration(client_side=True, max_message_length=LIMITS.max_message_bytes)
        )
        self.writer = Writer(Outbound(self.protocol.h2_connection, LIMITS), stream.send_all)
        self.gates = FlowGates()
        self.sender = MessageSender(
            self.protocol, self.writer, self.gates, LIMITS.max_message_bytes
        )
        self._calls: dict[int, Call] = {}
        self._ready = trio.Event()
        self._is_up = False
        self._failure: Callable[[], RpcError] | None = None
        self._goaway = False
        self._goaway_last_stream_id = 0
        self.closing_gracefully = False  # the server sent GOAWAY with NO_ERROR
        self._closing = False
        self.writer_done = trio.Event()
        self._writer_scope = trio.CancelScope(shield=True)
        self.protocol.initiate_connection()

    async def wait_ready(self) -> None:
        """Wait for the server's SETTINGS; raises ConnectError if the connection failed first."""
        self.flush()
        await self._ready.wait()
        if not self._is_up and self._failure is not None:
            raise self._failure()

    async def open_call(self, path: str, payload: bytes, grpc_timeout: float | None) -> Call:
        """Start a call and send its request. Raises ConnectionLost if the connection is gone.

        On cancellation the call is reset before the exception leaves.
        """
        if self._failure is not None:
            raise self._failure()
        if self._closing:
            raise ConnectionLost("the client is closed")
        if self._goaway:
            raise ConnectionLost("the server closed the connection")
        stream_id = self.protocol.get_next_available_stream_id()
        try:
            self.protocol.start_call(stream_id, str(self.address), path, grpc_timeout)
        except h2.exceptions.TooManyStreamsError:
            raise RpcError("RESOURCE_EXHAUSTED", "too many calls in progress") from None
        call = Call(self, stream_id)
        self._calls[stream_id] = call
        self.flush()
        try:
            await call.send_request(payload)
        except BaseException:
            call.close()
            raise
        return call

    def flush(self) -> None:
        """Have the writer send whatever h2 has queued. Sync: safe under cancellation."""
        self.writer.kick()

    def acknowledge(self, stream_id: int, flow_controlled_length: int) -> None:
        """Give flow-control credit back once a message has been consumed (backpressure)."""
        if self._failure is None and flow_controlled_length:
            self.protocol.acknowledge_received_data(stream_id, flow_controlled_length)
            self.flush()

    def release(self, call: Call, *, cancel: bool) -> None:
        self._calls.pop(call.stream_id, None)
        self.protocol.forget(call.stream_id)
        # A stream the server's GOAWAY did not take was never processed: nothing to reset
        # (and peers whose h2 closed on sending the GOAWAY treat any frame as an error).
        spared = not self._goaway or call.stream_id <= self._goaway_last_stream_id
        if cancel and self._failure is None and spared:
            try:
                self.protocol.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:  # already closed on the h2 level
                return
            self.flush()

    def close_gracefully(self) -> None:
        """Reset open calls; let the writer drain and stop (wait on ``writer_done``). Sync.

        No GOAWAY: h2 3.x (the server's too) moves a connection that received
        GOAWAY to CLOSED and refuses to send even on streams still open, which
        turns a server's in-flight responses into internal errors there.
        """
        for call in list(self._calls.values()):
            call.close()
        self._closing = True
        self.writer.close()

    @trio.lowlevel.enable_ki_protection
    async def run_writer(self) -> None:
        """The only task that sends on the stream. Returns when closing (after draining).

        Shielded from the cancellation of its nursery's surroundings: when the caller's block
        is cancelled, the RST_STREAMs its cleanup queues must still get out. Whoever closes
        the connection bounds the drain and then calls ``stop_writer()``.
        """
        try:
            with self._writer_scope:
                await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_from_transport(exc)
        finally:
            self.writer_done.set()

    def stop_writer(self) -> None:
        """End the writer now, sent or not (after a bounded wait for ``writer_done``)."""
        self._writer_scope.cancel()

    @trio.lowlevel.enable_ki_protection
    async def run_reader(self) -> None:
        """Feed received bytes to h2 and route the events; fail the connection at the end."""
        try:
            while True:
                try:
                    data = await self.stream.receive_some(LIMITS.receive_chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail_from_transport(exc)
                    return
                if not data:
                    self._fail_from_transport(None)
                    return
                events = self.protocol.receive_data(data)
                self.flush()  # h2 may have queued SETTINGS/PING acks or WINDOW_UPDATEs
                for event in events:
                    self._dispatch(event)
        except Exception:
            # The connection edge: a protocol violation by the server ends the
            # connection, never the program. Logged at DEBUG: a CLI must not
            # print tracebacks, and the caller gets ConnectionLost.
            log.debug("protocol error on the connection to %s", self.address, exc_info=True)
            if self._is_up:
                self._fail(functools.partial(ConnectionLost, "protocol error from the server"))
            else:
                message = f"cannot connect to {self.address}: the server does not speak gRPC"
                self._fail(functools.partial(ConnectError, message))

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, SettingsReceived):
            self._is_up = True
            self._ready.set()
            self.gates.open_all()  # the server's initial window may differ from the default
            return
        if isinstance(event, WindowUpdated):
            self.gates.opened(event.stream_id)
            return
        if isinstance(event, GoAway):
            self._on_goaway(event)
            return
        stream_id = event.stream_id
        call = self._calls.get(stream_id)
        if isinstance(event, ResponseReceived):
            if call is not None:
                call._started(event.custom_metadata)
            return
        if isinstance(event, MessageReceived):
            if call is None:  # a call we already closed: just hand the credit back
                self.acknowledge(stream_id, event.flow_controlled_length)
            else:
                call._deliver(event.data, event.flow_controlled_length)
        elif call is None:
            return
        elif isinstance(event, ResponseEnded):
            call._finish(event.status, event.custom_metadata)
        elif isinstance(event, StreamReset):
            call._fail(functools.partial(_reset_error, event.error_code))
        elif isinstance(event, StreamEnded) and not call.finished:
            call._fail(lambda: RpcError("INTERNAL", "the server ended the call without a status"))

    def _on_goaway(self, event: GoAway) -> None:
        # Calls the server will still finish keep running; new calls are refused. NO_ERROR
        # is a graceful close (a shutdown): the calls it ends may be retried later.
        self._goaway = True
        self._goaway_last_stream_id = event.last_stream_id
        self.closing_gracefully = event.error_code == h2.errors.ErrorCodes.NO_ERROR
        gone: Callable[[], RpcError] = (
            ServerShuttingDown
            if self.closing_gracefully
            else functools.partial(ConnectionLost, "the server closed the connection")
        )
        for stream_id, call in list(self._calls.items()):
            if stream_id > event.last_stream_id:
                call._fail(gone)

    def _fail_from_transport(self, exc: BaseException | None) -> None:
        if self._is_up:
            if not self.closing_gracefully:
                self._fail(ConnectionLost)
                return
            # The calls a graceful close cut short were ended by a shutdown; a call made
            # later (say after an idle close) just finds the connection closed.
            for call in list(self._calls.values()):
                call._fail(ServerShuttingDown)
            self._fail(functools.partial(ConnectionLost, "the server closed the connection"))
            return
        error = tls_failure(
            self.address, exc or EOFError(), self._client_cert, after_handshake=True
        )
        self._fail(functools.partial(ConnectError, str(error)))

    def _fail(self, failure: Callable[[], RpcError]) -> None:
        """Mark the connection failed and wake every call and waiter. Idempotent."""
        if self._failure is None:
            self._failure = failure
        for call in list(self._calls.values()):
            call._fail(failure)
        self._calls.clear()
        self._ready.set()
        self.gates.open_all()
        self.writer.close()  # drain what is queued (if the socket still takes it), then end
