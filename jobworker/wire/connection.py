"""The gRPC connection state machine that the server and the client both subclass.

purerpc's ``GRPCConnection`` does the gRPC framing on h2's state machine; this class fixes, for
both sides at once, what purerpc and h2 get wrong on the wire:

- the ``grpc-message`` trailer: purerpc escapes every reserved character (``:`` becomes
  ``%3A``), which Node clients show undecoded; here it is encoded exactly as the gRPC HTTP/2
  protocol says, and decoded leniently;
- a GOAWAY received: h2 3.2 closes the whole connection state machine on it, so the frames
  that still belong to streams the GOAWAY let finish (a graceful shutdown's final trailers)
  become protocol errors. RFC 7540 6.8 lets those streams complete; here they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import h2.connection
import h2.events
from h2.errors import ErrorCodes
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import ResponseEnded
from purerpc.grpclib.headers import sanitize_headers
from purerpc.grpclib.status import Status

from jobworker.wire.status import decode_grpc_message, encode_grpc_message

__all__ = ["H2Connection", "WireConnection"]


class H2Connection(h2.connection.H2Connection):  # type: ignore[misc]  # h2 3.2 is untyped
    """h2's connection, except that a GOAWAY received leaves the streams it spares usable."""

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

    # -- sending: the status trailers -------------------------------------------------------

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
        trailers = [*_status_trailers(status), *sanitize_headers(custom_metadata)]
        self.h2_connection.send_headers(stream_id, trailers, end_stream=True)

    # -- receiving: the status a peer sent --------------------------------------------------

    def _response_received(self, event: h2.events.ResponseReceived) -> list[Any]:
        return _with_decoded_status(super()._response_received(event), event.headers)

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Any]:
        return _with_decoded_status(super()._trailers_received(event), event.headers)


def _status_trailers(status: Status) -> list[tuple[str, str]]:
    trailers = [("grpc-status", str(status.int_value))]
    if status.status_message:
        trailers.append(("grpc-message", encode_grpc_message(status.status_message)))
    return trailers


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
