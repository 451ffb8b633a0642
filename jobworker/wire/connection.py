"""The gRPC connection state machine that the server and the client both subclass.

purerpc's ``GRPCConnection`` does the gRPC framing on h2's state machine; this class fixes, for
both sides at once, what purerpc and h2 get wrong on the wire:

- the ``grpc-message`` trailer: purerpc escapes every reserved character (``:`` becomes
  ``%3A``), which Node clients show undecoded; here it is encoded exactly as the gRPC HTTP/2
  protocol says, and decoded leniently;
- a GOAWAY received: h2 3.2 closes the whole connection state machine on it, so the frames
  that still belong to streams the GOAWAY let finish (a graceful shutdown's final trailers)
  become protocol errors. RFC 7540 6.8 lets those streams complete; here they do.

And it sends the header blocks every RPC repeats (the response headers, the OK trailers)
from a block encoded once: static-table indices and never-indexed literals only, so the
block is valid whatever state the connection's HPACK encoder is in, and it skips h2's
per-call normalising, validating and encoding of the same few headers.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
from h2.connection import ConnectionInputs
from h2.errors import ErrorCodes
from h2.stream import StreamInputs
from hpack import Encoder, NeverIndexedHeaderTuple
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import ResponseEnded, ResponseReceived
from purerpc.grpclib.headers import sanitize_headers
from purerpc.grpclib.status import Status, StatusCode

from jobworker.wire.status import decode_grpc_message, encode_grpc_message

__all__ = ["H2Connection", "PrecomputedHeaders", "WireConnection"]

# A DATA frame's header: 24-bit length (as 16 + 8 bits), type 0, no flags, the stream id.
_DATA_FRAME_HEADER = struct.Struct(">HBBBL")


class _BlockEncoder:
    """Stands in for h2's HPACK encoder for one header list: its block, encoded once."""

    def __init__(self, block: bytes) -> None:
        self._block = block

    def encode(self, headers: object, huffman: bool = True) -> bytes:
        # ``headers`` is h2's lazy normalising and validating pipeline: never iterated, so
        # none of it runs (the list was checked once, when it was encoded).
        return self._block


class PrecomputedHeaders(list[tuple[str, str]]):
    """A header list that every call sends the same, with its HPACK block encoded once.

    The block uses only the static table and literals that are never indexed, so it changes
    no decoder's dynamic table and is correct after whatever the connection sent before.
    """

    def __init__(self, headers: Iterable[tuple[str, str]]) -> None:
        super().__init__(headers)
        never_indexed = [NeverIndexedHeaderTuple(name, value) for name, value in self]
        self.encoder = _BlockEncoder(Encoder().encode(never_indexed))


class H2Connection(h2.connection.H2Connection):  # type: ignore[misc]  # h2 3.2 is untyped
    """h2's connection, except that a GOAWAY received leaves the streams it spares usable,
    and that PrecomputedHeaders go out as their ready-made block."""

    encoder: Any  # hpack's Encoder (untyped)

    def send_headers(
        self, stream_id: int, headers: Any, end_stream: bool = False, **priority: Any
    ) -> None:
        # A pending table size change must open the next block: the real encoder writes it.
        if isinstance(headers, PrecomputedHeaders) and not self.encoder.header_table.resized:
            encoder, self.encoder = self.encoder, headers.encoder
            try:
                super().send_headers(stream_id, headers, end_stream, **priority)
            finally:
                self.encoder = encoder
            return
        super().send_headers(stream_id, headers, end_stream, **priority)

    def send_data_frames(self, stream_id: int, data: bytes | memoryview) -> None:
        """Queue ``data`` on a stream as DATA frames of at most the peer's frame size.

        The same checks and flow-control accounting as h2's ``send_data``, one call for a
        whole window's worth, and each frame's 9-byte header written directly rather than
        through a frame object per 16 KiB.
        """
        size = len(data)
        window = self.local_flow_control_window(stream_id)  # raises for a closed stream
        if size > window:
            raise h2.exceptions.FlowControlError(
                f"Cannot send {size} bytes, flow control window is {window}."
            )
        stream = self.streams[stream_id]
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        out = self._data_to_send
        view = memoryview(data)
        step = self.max_outbound_frame_size
        for start in range(0, size, step):
            piece = view[start : start + step]
            length = len(piece)
            out += _DATA_FRAME_HEADER.pack(length >> 8, length & 0xFF, 0, 0, stream_id)
            out += piece

    def _receive_goaway_frame(self, frame: Any) -> Any:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class WireConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's gRPC connection with the status trailers encoded and decoded correctly, on
    an :class:`H2Connection`."""

    h2_connection: Any

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.h2_connection = H2Connection(self.h2_connection.config)
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    # -- sending: the response headers and the status trailers -----------------------------

    def start_response(
        self, stream_id: int, content_type_suffix: str = "", custom_metadata: Any = ()
    ) -> None:
        """The response headers; the common ones from a block encoded once."""
        if content_type_suffix or custom_metadata:
            super().start_response(stream_id, content_type_suffix, custom_metadata)
            return
        headers = _response_headers(
            self.config._message_encoding, self.config._message_accept_encoding
        )
        self.h2_connection.send_headers(stream_id, headers, end_stream=False)

    def respond_status(
        self,
        stream_id: int,
        status: Status,
        content_type_suffix: str = "",
        custom_metadata: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """A trailers-only response (no message was sent on the stream)."""
        trailers = [
            (":status", "200"),
            ("content-type", "application/grpc" + content_type_suffix),
            *_status_trailers(status),
            *sanitize_headers(custom_metadata),
        ]
        self.h2_connection.send_headers(stream_id, trailers, end_stream=True)

    def end_response(
        self, stream_id: int, status: Status, custom_metadata: Iterable[tuple[str, Any]] = ()
    ) -> None:
        """The trailers that end a response after its messages."""
        if (
            status.status_code == StatusCode.OK
            and not status.status_message
            and not custom_metadata
        ):
            self.h2_connection.send_headers(stream_id, OK_TRAILERS, end_stream=True)
            return
        trailers = [*_status_trailers(status), *sanitize_headers(custom_metadata)]
        self.h2_connection.send_headers(stream_id, trailers, end_stream=True)

    # -- receiving: the status a peer sent --------------------------------------------------

    def _response_received(self, event: h2.events.ResponseReceived) -> list[Any]:
        events = _with_decoded_status(super()._response_received(event), event.headers)
        if event.stream_ended:
            _move_metadata_to_trailers(events)
        return events

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Any]:
        return _with_decoded_status(super()._trailers_received(event), event.headers)


OK_TRAILERS = PrecomputedHeaders([("grpc-status", "0")])


@functools.cache
def _response_headers(encoding: str | None, accept_encoding: str | None) -> PrecomputedHeaders:
    """The headers purerpc's start_response sends for these encodings, ready-made."""
    headers = [(":status", "200"), ("content-type", "application/grpc")]
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    if accept_encoding is not None:
        headers.append(("grpc-accept-encoding", accept_encoding))
    return PrecomputedHeaders(headers)


def _status_trailers(status: Status) -> list[tuple[str, str]]:
    trailers = [("grpc-status", str(status.int_value))]
    if status.status_message:
        trailers.append(("grpc-message", encode_grpc_message(status.status_message)))
    return trailers


def _move_metadata_to_trailers(events: list[Any]) -> None:
    """In a trailers-only response the one header block is the trailers, custom metadata
    included (as grpc clients read it); purerpc gives that metadata to the response's
    start instead."""
    received = next((e for e in events if isinstance(e, ResponseReceived)), None)
    ended = next((e for e in events if isinstance(e, ResponseEnded)), None)
    if received is not None and ended is not None:
        ended.custom_metadata = (*received.custom_metadata, *ended.custom_metadata)
        received.custom_metadata = ()


def _with_decoded_status(events: list[Any], headers: Sequence[tuple[Any, Any]]) -> list[Any]:
    """Re-decode the ``grpc-message`` of a ResponseEnded with our lenient decoder."""
    raw = next(
        (value for name, value in headers if name in ("grpc-message", b"grpc-message")), None
    )
    if raw is None:
        return events
    for event in events:
        if isinstance(event, ResponseEnded):
            event.status = Status(event.status.int_value, decode_grpc_message(raw))
    return events
