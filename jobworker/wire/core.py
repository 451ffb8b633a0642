"""The gRPC-over-HTTP/2 core that the server and the client both drive, without I/O.

One connection's protocol state is a :class:`~jobworker.wire.connection.WireConnection`
(purerpc's gRPC framing and message types on h2's state machine, with their wire defects
fixed). What this module adds is what each side used to carry its own copy of:

- :class:`WireLimits`: every limit of a connection, defined once (message size, frame
  size, header list size, concurrent streams, flow-control windows, how much may wait
  for the socket). The server's flags and the client's defaults both become one of these.
- :func:`apply_limits` / :func:`initiate`: the SETTINGS a side advertises and the
  connection window it opens, from its limits.
- :class:`Outbound`: the one writer discipline. h2 queues bytes; exactly one writer takes
  them (at most ``write_chunk`` at a time) and says when the kernel accepted them;
  ``pending()`` counts both, so a sender can wait while too much is queued
  (``writable()``): a peer that never reads cannot make us buffer without bound.
- :func:`send_step`: the one flow-control path for sending a message: as much as the
  stream's window (and the peer's frame size) allows, or nothing if the window is shut.

The thin Trio I/O that drives it is :mod:`jobworker.wire.trio_io`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import h2.settings
from h2.settings import SettingCodes
from purerpc.grpclib.exceptions import MessageTooLargeError

from jobworker.wire.contract import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "CLIENT_LIMITS",
    "GRPC_MESSAGE_PREFIX",
    "H2_DEFAULT_WINDOW",
    "Outbound",
    "OutgoingMessage",
    "WireLimits",
    "apply_limits",
    "initiate",
    "send_step",
]

GRPC_MESSAGE_PREFIX = 5  # compressed flag + 4-byte length before every gRPC message
H2_DEFAULT_WINDOW = 65_535  # RFC 7540: every window starts here until SETTINGS/WINDOW_UPDATE


@dataclass(frozen=True)
class WireLimits:
    """Every limit of one connection, for either side.

    The receive windows bound what a peer may send ahead of our reading; a message's bytes
    are acknowledged only once the whole message has been taken, so a stream's window must
    hold one maximal message. ``connection_window`` defaults to ``connection_window_messages``
    such windows.
    """

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_streams: int = 100  # inbound streams per connection (grpc-go's default)
    max_frame_size: int = 16_384  # the RFC's default; larger frames only help bulk uploads
    max_header_list_size: int = 8_192  # a path, a few headers, maybe a timeout
    connection_window_messages: int = 2
    connection_window_bytes: int | None = None  # overrides connection_window_messages
    outbound_high_water: int = 256 * 1024  # queued-for-socket bytes above which senders wait
    write_chunk: int = 256 * 1024  # at most this much handed to one socket send
    receive_chunk: int = 256 * 1024  # bytes read from the socket at a time

    @property
    def stream_window(self) -> int:
        """Receive window per stream: one maximal message fits."""
        return self.max_message_bytes + GRPC_MESSAGE_PREFIX

    @property
    def connection_window(self) -> int:
        """Receive window per connection: bounds the bytes buffered for all its streams."""
        if self.connection_window_bytes is not None:
            return self.connection_window_bytes
        return self.connection_window_messages * self.stream_window


# A client's streams are read at the pace of their callers, each bounded by its own window;
# the connection window only has to keep one slow stream from holding up the others. Large
# frames let a server send each output chunk as one DATA frame.
CLIENT_LIMITS = WireLimits(max_frame_size=2**24 - 1, connection_window_bytes=2**30)


def apply_limits(h2_connection: Any, limits: WireLimits, *, client_side: bool) -> None:
    """Advertise ``limits`` as our SETTINGS and enforce the inbound frame size."""
    h2_connection.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        },
    )
    h2_connection.max_inbound_frame_size = limits.max_frame_size


def initiate(h2_connection: Any, limits: WireLimits) -> None:
    """Queue the connection preface (our SETTINGS) and open the connection window."""
    h2_connection.initiate_connection()
    extra = limits.connection_window - H2_DEFAULT_WINDOW
    if extra > 0:
        h2_connection.increment_flow_control_window(extra)


class Outbound:
    """The bytes one connection owes its socket, and the one writer's hold on them."""

    def __init__(self, h2_connection: Any, limits: WireLimits) -> None:
        self._h2 = h2_connection
        self._limits = limits
        self._in_flight = 0

    def pending(self) -> int:
        """Bytes produced by h2 and not yet accepted by the kernel."""
        return len(self._h2._data_to_send) + self._in_flight

    def writable(self) -> bool:
        """Whether a sender may queue more (fewer than ``outbound_high_water`` bytes wait)."""
        return self.pending() < self._limits.outbound_high_water

    def take(self) -> bytes | bytearray:
        """The next bytes for the socket (empty if none); they count as pending until
        :meth:`sent`. Usually all that is queued, handed over as it is, without a copy."""
        h2_connection = self._h2
        queued: bytearray = h2_connection._data_to_send
        if len(queued) <= self._limits.write_chunk:
            h2_connection._data_to_send = bytearray()
            data: bytes | bytearray = queued
        else:
            data = h2_connection.data_to_send(self._limits.write_chunk)
        self._in_flight = len(data)
        return data

    def sent(self) -> None:
        """The bytes of the last :meth:`take` left (or failed to: the connection is over)."""
        self._in_flight = 0


class OutgoingMessage:
    """One gRPC message on its way out, uncompressed: the 5-byte prefix, then the payload,
    handed to h2 in window-sized pieces that are views of the payload, not copies."""

    __slots__ = ("_payload", "_sent")

    def __init__(self, payload: bytes, max_message_bytes: int) -> None:
        if len(payload) > max_message_bytes:
            raise MessageTooLargeError(
                f"message of {len(payload)} bytes is over the limit of {max_message_bytes}"
            )
        self._payload = memoryview(payload)
        self._sent = -GRPC_MESSAGE_PREFIX  # the prefix goes first

    def __len__(self) -> int:
        return len(self._payload) - self._sent

    def take(self, amount: int) -> bytes | memoryview:
        """The next ``amount`` bytes (fewer at the end)."""
        start = self._sent
        if start < 0:  # what is left of the prefix, and as much payload as fits behind it
            prefix = struct.pack(">BI", 0, len(self._payload))[start:]
            if amount <= len(prefix):
                self._sent = start + amount
                return prefix[:amount]
            end = min(amount - len(prefix), len(self._payload))
            self._sent = end
            return prefix + self._payload[:end]
        end = min(start + amount, len(self._payload))
        self._sent = end
        return self._payload[start:end]


def send_step(connection: Any, stream_id: int, message: OutgoingMessage) -> bool:
    """Hand h2 as much of ``message`` as ``stream_id``'s flow-control window allows, as
    frames of the peer's maximum size.

    Returns False, sending nothing, while the window is shut (wait for a WINDOW_UPDATE).
    Raises h2's StreamClosedError for a stream the peer reset meanwhile.
    """
    h2_connection = connection.h2_connection
    window: int = h2_connection.local_flow_control_window(stream_id)
    if window <= 0:
        return False
    h2_connection.send_data_frames(stream_id, message.take(window))
    return True
