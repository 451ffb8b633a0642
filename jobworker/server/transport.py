"""HTTP/2 + gRPC framing for one server connection: purerpc's machinery with its defects fixed.

purerpc 0.8.0 (pinned exactly: this module subclasses its internals) is used for the HTTP/2
state (h2), gRPC headers and message framing. What changes here, and why:

- Limits advertised in SETTINGS *and* enforced: max concurrent streams per connection (an
  excess stream is refused with RST_STREAM(REFUSED_STREAM); the connection lives on), a
  16 KiB max frame size, bounded flow-control windows (stock: 64 MiB per stream, 1 GiB per
  connection). Inbound memory per connection is bounded by the connection window.
- A request message larger than the limit ends that stream with RESOURCE_EXHAUSTED; the
  connection lives on (stock: the whole connection died). The limit is checked on the
  5-byte length prefix, so nothing of an oversized message is buffered.
- RST_STREAM from the client (cancel, deadline) cancels the stream's handler at once
  (stock: ignored).
- Outbound: a sender waits while more than the limits' ``outbound_high_water`` bytes are
  queued for the socket, so a client that advertises a huge window and never reads the
  socket cannot make the server buffer without bound (the writer, the flow-control path and
  the limits are the wire core's, shared with the client: jobworker.wire).
- A late WINDOW_UPDATE or RST_STREAM for a stream we already finished is ignored, as RFC
  7540 requires (h2 3.2 answered GOAWAY STREAM_CLOSED: every RPC on the connection died).
- Every stream is forgotten when its handler ends, whatever the client does (stock: kept
  until both sides closed it, forever for a client that never half-closes).
- GOAWAY lets the open streams finish with their statuses (h2's close_connection() made
  every later frame of the connection a protocol error).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
from h2.connection import ConnectionInputs
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import (
    Event,
    MessageReceived,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import (
    GRPCError,
    MessageTooLargeError,
    UnsupportedMessageEncodingError,
)
from purerpc.grpclib.status import Status, StatusCode

from jobworker.wire.connection import H2Connection, WireConnection
from jobworker.wire.core import Outbound, WireLimits, apply_limits, initiate
from jobworker.wire.keepalive import TOO_MANY_PINGS, Keepalive, KeepalivePolicy
from jobworker.wire.trio_io import FlowGates, MessageSender, Writer

log = logging.getLogger(__name__)

# Dead-peer detection below gRPC's keepalive: the kernel's, for a peer that vanished while
# we had nothing to send.
TCP_KEEPIDLE_S = 300
TCP_KEEPINTVL_S = 30
TCP_KEEPCNT = 5


class BadRequestMessage(Event):  # type: ignore[misc]
    """A request message that cannot be accepted (too large, compressed): its stream ends
    with ``code`` and ``message``; the connection lives on."""

    def __init__(self, stream_id: int, code: StatusCode, message: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message


class StreamResetByPeer(Event):  # type: ignore[misc]
    """The client sent RST_STREAM (it cancelled the call or its deadline passed)."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class PeerGoAway(Event):  # type: ignore[misc]
    """The client sent GOAWAY: it opens no new stream on this connection."""


class _H2Connection(H2Connection):
    """h2's connection, refusing an excess stream alone instead of killing the connection.

    h2 3.2 raises TooManyStreamsError (a connection error) when a HEADERS frame would exceed
    our MAX_CONCURRENT_STREAMS, and only once the client acknowledged the setting. Here the
    limit applies from the first frame, and the excess stream is reset with REFUSED_STREAM
    (RFC 7540 5.1.2), which gRPC clients treat as retryable.
    """

    stream_limit: int = WireLimits.max_concurrent_streams  # set per connection
    refused_streams: int = 0
    # Told of every PING frame received: (payload, is_ack). h2 answers the peer's PINGs.
    on_ping: Callable[[bytes, bool], None] | None = None

    def _receive_ping_frame(self, frame: Any) -> Any:
        result = super()._receive_ping_frame(frame)
        if self.on_ping is not None:
            self.on_ping(bytes(frame.opaque_data), "ACK" in frame.flags)
        return result

    def _receive_headers_frame(self, frame: Any) -> Any:
        if frame.stream_id not in self.streams and self.open_inbound_streams >= self.stream_limit:
            # Let h2 open the stream (keeps HPACK state and stream ids consistent), then
            # refuse it. Any DATA that follows is acknowledged and dropped by h2.
            frames, events = self._receive_headers_without_limit(frame)
            stream = self.streams.get(frame.stream_id)
            if stream is not None and stream.open:
                frames = list(frames) + list(
                    stream.reset_stream(h2.errors.ErrorCodes.REFUSED_STREAM)
                )
            self.refused_streams += 1
            # One WARNING per connection: a client flooding streams must not flood the log.
            log.log(
                logging.WARNING if self.refused_streams == 1 else logging.DEBUG,
                "refused stream %d: %d streams already open on this connection",
                frame.stream_id,
                self.stream_limit,
            )
            # The connection-level events (none for HEADERS) are kept; the stream's are not.
            return frames, [e for e in events if getattr(e, "stream_id", 0) == 0]
        return super()._receive_headers_frame(frame)

    def _receive_window_update_frame(self, frame: Any) -> Any:
        if self._forgotten(frame.stream_id):
            # RFC 7540 6.9: a WINDOW_UPDATE may follow our END_STREAM; nothing to update.
            events = self.state_machine.process_input(ConnectionInputs.RECV_WINDOW_UPDATE)
            return [], events
        return super()._receive_window_update_frame(frame)

    def _receive_rst_stream_frame(self, frame: Any) -> Any:
        if self._forgotten(frame.stream_id):
            # RFC 7540 5.1: RST_STREAM on a closed stream is allowed; the stream is gone.
            events = self.state_machine.process_input(ConnectionInputs.RECV_RST_STREAM)
            return [], events
        return super()._receive_rst_stream_frame(frame)

    def _forgotten(self, stream_id: int) -> bool:
        """A stream that was open once and that h2 has already dropped from ``streams``.

        h2 3.2 treats a late WINDOW_UPDATE / RST_STREAM for such a stream (one it closed with
        END_STREAM) as a connection error: GOAWAY STREAM_CLOSED, and every RPC on the
        connection fails. grpcio sends exactly these frames when its reads race our
        trailers, so under load healthy clients lost whole connections.
        """
        client_stream = stream_id % 2 == 1  # clients open odd ids; we open none
        return (
            client_stream
            and stream_id <= self.highest_inbound_stream_id
            and stream_id not in self.streams
        )

    def announce_goaway(self) -> None:
        """Queue GOAWAY(NO_ERROR) naming the highest stream we received.

        h2's close_connection() also moves the connection to its CLOSED state, where every
        later send (the trailers of the streams that GOAWAY lets finish) and every frame the
        peer still sends (WINDOW_UPDATE, PING) is a ProtocolError: a graceful shutdown ended
        every stream without its status. Only the frame is sent here; refusing new streams
        is ServerSocket's job (``goaway_sent``).
        """
        frame = GoAwayFrame(
            stream_id=0, last_stream_id=self.highest_inbound_stream_id, error_code=0
        )
        self._prepare_for_sending([frame])

    def _receive_headers_without_limit(self, frame: Any) -> Any:
        settings = self.local_settings
        # local_settings.max_concurrent_streams is what h2 checks; lift it for this one call.
        original = settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS]
        settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = collections.deque([2**31 - 1])
        try:
            return super()._receive_headers_frame(frame)
        finally:
            settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = original


class ServerGRPCConnection(WireConnection):
    """purerpc's gRPC-over-h2 state machine with our limits (see the module docstring)."""

    h2_connection: Any
    message_read_buffers: dict[int, Any]
    keepalive: Keepalive  # the connection's, set by ServerSocket

    def __init__(self, config: GRPCConfiguration, limits: WireLimits) -> None:
        self.limits = limits
        super().__init__(config)
        # Replace purerpc's plain H2Connection by ours (same configuration).
        self.h2_connection = _H2Connection(self.h2_connection.config)
        self.h2_connection.stream_limit = limits.max_concurrent_streams
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    def _set_h2_connection_local_settings(self) -> None:
        apply_limits(self.h2_connection, self.limits, client_side=False)  # set before super()

    def initiate_connection(self) -> None:
        initiate(self.h2_connection, self.limits)

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[Event]:
        # A new initial window size changes every stream's window: blocked senders look again.
        return [WindowUpdated(0, 0)]

    def _data_received(self, event: h2.events.DataReceived) -> list[Event]:
        buffer = self.message_read_buffers.get(event.stream_id)
        if buffer is None:
            # The stream's request already ended or was refused: drop the bytes but give
            # the window back, or the connection would stall.
            self.h2_connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return []
        try:
            buffer.data_received(event.data, event.flow_controlled_length)
            return [
                MessageReceived(event.stream_id, message, length)
                for message, length in buffer.read_all_complete_messages_flowcontrol()
            ]
        except MessageTooLargeError:
            code = StatusCode.RESOURCE_EXHAUSTED
            limit = self.config.max_message_length
            text = f"request message too large: {buffer._message_length} bytes (limit {limit})"
        except UnsupportedMessageEncodingError:
            code = StatusCode.UNIMPLEMENTED
            text = "compressed request messages are not supported"
        del self.message_read_buffers[event.stream_id]
        self.h2_connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return [BadRequestMessage(event.stream_id, code, text)]

    def _request_received(self, event: h2.events.RequestReceived) -> list[Event]:
        events: list[Event] = super()._request_received(event)
        # Whatever grpc-encoding the client names, no decompression: we advertise none, and
        # purerpc would inflate without a size limit (a compression bomb). A message with
        # the compressed flag set fails alone with UNIMPLEMENTED.
        self.message_read_buffers[event.stream_id] = MessageReadBuffer(
            None, self.config.max_message_length
        )
        return events

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Event]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamResetByPeer(event.stream_id, int(event.error_code or 0))]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Event]:
        return [PeerGoAway()]


class ServerStream:
    """One RPC's HTTP/2 stream, as its handler sees it: the request's events in order, the
    response sent through the connection's flow control and writer, and the handler's
    cancel scope, cancelled on the client's reset."""

    def __init__(self, socket: ServerSocket, stream_id: int) -> None:
        self._socket = socket
        self._connection = socket.connection
        self.stream_id = stream_id
        self.cancel_scope: trio.CancelScope | None = None
        self.reset_by_peer = False
        self.closing = False  # set when the server cancels it for shutdown / idle close
        self.response_started = False
        self.locally_closed = False  # our trailers are queued
        # Bounded by flow control: only MessageReceived carries data, and its window is
        # given back only when the handler takes it.
        self._events: collections.deque[Event] = collections.deque()
        self._arrived = trio.Event()
        self._discarded = False

    def cancel(self, *, reset_by_peer: bool = False, closing: bool = False) -> None:
        """Cancel the handler (if running). Safe to call any number of times."""
        self.reset_by_peer = self.reset_by_peer or reset_by_peer
        self.closing = self.closing or closing
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    def has_event(self) -> bool:
        """Whether an event is queued (``next_event`` would return it at once)."""
        return bool(self._events)

    async def next_event(self) -> Event:
        """The next event of this stream (RequestReceived, MessageReceived with raw bytes,
        RequestEnded, BadRequestMessage). A received message's window is handed back here,
        i.e. only once the handler takes it.

        An event already queued is taken without a checkpoint: a unary RPC reads three
        (request headers, message, end) queued together, and each checkpoint is a scheduler
        round with an epoll_wait. The handler's later awaits (the send) still checkpoint."""
        while not self._events:
            await self._arrived.wait()
            self._arrived = trio.Event()
        event = self._events.popleft()
        if isinstance(event, MessageReceived):
            self._connection.acknowledge_received_data(self.stream_id, event.flow_controlled_length)
            self._socket.writer.kick()
        return event

    async def start_response(self, custom_metadata: Sequence[tuple[str, str]] = ()) -> None:
        """Send the response headers (with ``custom_metadata``, if any)."""
        try:
            self._connection.start_response(self.stream_id, custom_metadata=custom_metadata)
        except h2.exceptions.StreamClosedError:
            await self._gone()
        self.response_started = True
        self._connection.keepalive.sent_headers_or_data()
        self._socket.writer.kick()

    async def send_message(self, message: Any) -> None:
        """Send one message, waiting on HTTP/2 flow control and on the socket (a bounded
        amount queued per connection): a slow reader holds one message, not the server."""
        try:
            await self._socket.sender.send(self.stream_id, message.SerializeToString())
        except h2.exceptions.StreamClosedError:
            await self._gone()
        self._connection.keepalive.sent_headers_or_data()

    async def close(self, status: Status, custom_metadata: Sequence[tuple[str, str]] = ()) -> None:
        """End the response with ``status`` and ``custom_metadata`` (trailers, or a
        trailers-only response)."""
        if self.locally_closed:
            return
        self.locally_closed = True
        if self.response_started:
            self._connection.end_response(self.stream_id, status, custom_metadata)
        else:
            self._connection.respond_status(self.stream_id, status, custom_metadata=custom_metadata)
        self._socket.writer.kick()
        await trio.lowlevel.checkpoint()

    async def _gone(self) -> None:
        """The client reset the stream and h2 knew before our event loop did: end the handler
        as the reset would have (Cancelled from the stream's scope)."""
        self.cancel(reset_by_peer=True)
        await trio.lowlevel.checkpoint()
        raise RuntimeError("stream reset by the client outside of its handler")  # unreachable

    def feed(self, event: Event) -> None:
        """Queue an event for the handler."""
        if self._discarded:
            self._give_back(event)
            return
        self._events.append(event)
        self._arrived.set()

    def discard(self) -> None:
        """Drop whatever the handler did not consume; later events are dropped too."""
        self._discarded = True
        while self._events:
            self._give_back(self._events.popleft())

    def _give_back(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            self._connection.acknowledge_received_data(self.stream_id, event.flow_controlled_length)


class ServerSocket:
    """The server side of one gRPC connection: reads frames and feeds streams.

    ``run(spawn)`` reads until the peer closes, sends GOAWAY, or breaks the protocol, and
    calls ``spawn(stream)`` for each new RPC. Run it inside ``async with running()``, in
    the task that owns the handlers: the writer task lives in that block, so a failed
    write cancels them, and leaving the block sends what is still queued.
    """

    def __init__(
        self,
        config: GRPCConfiguration,
        sock: anyio.abc.ByteStream,
        *,
        limits: WireLimits,
        keepalive: KeepalivePolicy | None = None,
    ) -> None:
        self._sock = sock
        self._limits = limits
        self.connection = ServerGRPCConnection(config, limits)
        self.writer = Writer(Outbound(self.connection.h2_connection, limits), sock.send)
        self.gates = FlowGates()
        self.sender = MessageSender(
            self.connection, self.writer, self.gates, limits.max_message_bytes
        )
        self.keepalive = Keepalive(keepalive or KeepalivePolicy(), trio.current_time())
        self.connection.keepalive = self.keepalive
        self.connection.h2_connection.on_ping = self._on_ping
        self._ping_acked = trio.Event()
        self.too_many_pings = False
        self._streams: dict[int, ServerStream] = {}
        self.last_activity = trio.current_time()  # last RPC start or end (pings do not count)
        self.goaway_sent = False
        self.close_reason = ""  # set when the server decides to close (for the log)
        self.protocol_error = False  # the client broke HTTP/2 or gRPC: logged at INFO
        self._no_streams = trio.Event()
        self._no_streams.set()

    @property
    def streams(self) -> dict[int, ServerStream]:
        return self._streams

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The connection's writer, for the duration of the block: our SETTINGS go out at
        once; leaving the block normally sends what is queued (trailers, GOAWAY) first."""
        _set_socket_options(self._sock)
        self.connection.initiate_connection()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.writer.run)
            try:
                yield
            finally:
                self.writer.close()

    async def run(self, spawn: Callable[[ServerStream], None]) -> str:
        """Read and dispatch until the connection ends; return why, for the log.

        Raises nothing for a peer that vanished or spoke bad HTTP/2 (returns the reason).
        """
        connection = self.connection
        writer = self.writer
        receive_chunk = self._limits.receive_chunk
        while True:
            # What we owe the peer (PING and SETTINGS acks, resets) grows with what it sends:
            # a peer that never reads must not make that queue grow without bound. Stop reading
            # until it drains (the peer then blocks on TCP: backpressure).
            await writer.wait_writable()
            try:
                data = await self._sock.receive(receive_chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return "closed by peer"
            except OSError as exc:
                return f"read error: {exc.strerror or exc}"
            self.keepalive.received(trio.current_time())
            # Reading does not count as activity: only RPCs do (a client that sends PINGs and
            # nothing else is idle, as with gRPC's MAX_CONNECTION_IDLE).
            try:
                events = connection.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 has already queued a GOAWAY with the right error code.
                writer.kick()
                self.protocol_error = True
                return f"HTTP/2 protocol error ({exc.__class__.__name__})"
            except (GRPCError, KeyError, ValueError, UnicodeError) as exc:
                # purerpc's parsing of gRPC headers (its ProtocolError, KeyError on a missing
                # pseudo-header, ValueError on a bad grpc-timeout, ...): a bad client, not us.
                with contextlib.suppress(h2.exceptions.H2Error):
                    connection.h2_connection.close_connection(
                        error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR
                    )
                writer.kick()
                self.protocol_error = True
                return f"malformed gRPC request ({exc.__class__.__name__})"
            if self.too_many_pings:
                with contextlib.suppress(h2.exceptions.H2Error):
                    connection.h2_connection.close_connection(
                        error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                        additional_data=TOO_MANY_PINGS,
                    )
                writer.kick()
                self.protocol_error = True
                return "too many pings"
            writer.kick()
            for event in events:
                # PeerGoAway: the client opens no new stream; running ones go on. Ignored.
                self._dispatch(event, spawn)

    def _on_ping(self, payload: bytes, ack: bool) -> None:
        if ack:
            if self.keepalive.ack_received(payload):
                self._ping_acked.set()
        elif self.keepalive.peer_pinged(trio.current_time()):
            self.too_many_pings = True

    def send_keepalive_ping(self) -> trio.Event:
        """Queue a PING for a quiet peer; the returned event is set when it is answered."""
        self._ping_acked = trio.Event()
        self.connection.h2_connection.ping(self.keepalive.ping_sent(trio.current_time()))
        self.writer.kick()
        return self._ping_acked

    def _dispatch(self, event: Event, spawn: Callable[[ServerStream], None]) -> None:
        if isinstance(event, WindowUpdated):
            self.gates.opened(event.stream_id)
            return
        stream_id = getattr(event, "stream_id", None)
        if isinstance(event, RequestReceived):
            if self.goaway_sent:  # a stream opened after our GOAWAY: not served (RFC 7540 6.8)
                self.connection.message_read_buffers.pop(event.stream_id, None)
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.connection.h2_connection.reset_stream(
                        event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM
                    )
                return
            stream = ServerStream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            self.last_activity = trio.current_time()
            if self._no_streams.is_set():
                self._no_streams = trio.Event()
            stream.feed(event)
            spawn(stream)
            return
        target = self._streams.get(stream_id) if stream_id is not None else None
        if target is None:
            # The handler already finished: give back the window of late data, drop the rest.
            if isinstance(event, MessageReceived):
                self.connection.acknowledge_received_data(
                    event.stream_id, event.flow_controlled_length
                )
            return
        if isinstance(event, StreamResetByPeer):
            target.cancel(reset_by_peer=True)
            return
        target.feed(event)

    def forget(self, stream: ServerStream) -> None:
        """Release everything held for ``stream``; reset it if the client may still send."""
        self._streams.pop(stream.stream_id, None)
        self.connection.message_read_buffers.pop(stream.stream_id, None)
        self.gates.opened(stream.stream_id)
        self.last_activity = trio.current_time()
        if not self._streams:
            self._no_streams.set()
        stream.discard()
        h2_stream = self.connection.h2_connection.streams.get(stream.stream_id)
        if h2_stream is not None and h2_stream.open:
            # We are done, the client is not: tell it to stop sending (grpc servers do the
            # same). NO_ERROR after a complete response, CANCEL otherwise.
            code = (
                h2.errors.ErrorCodes.NO_ERROR
                if stream.locally_closed
                else h2.errors.ErrorCodes.CANCEL
            )
            with contextlib.suppress(h2.exceptions.H2Error):
                self.connection.h2_connection.reset_stream(stream.stream_id, code)
            self.writer.kick()

    async def wait_no_streams(self) -> None:
        """Return once no RPC is running on this connection."""
        while self._streams:
            await self._no_streams.wait()

    async def send_goaway(self) -> None:
        """Tell the client that no new stream will be accepted (idempotent). The streams
        already open go on: they still send their responses and statuses."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self.connection.h2_connection.announce_goaway()
        self.writer.kick()
        await trio.lowlevel.checkpoint()


def _set_socket_options(stream: anyio.abc.ByteStream) -> None:
    """No Nagle (a response's frames go out at once), and TCP keepalive."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)  # noqa: S610 (anyio)
    if sock is None:  # not a socket (in-process tests)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with contextlib.suppress(AttributeError, OSError):  # Linux names
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
