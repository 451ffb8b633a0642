"""The gRPC connection state machine that the server and the client both subclass.

purerpc's ``GRPCConnection`` does the gRPC framing on h2's state machine; this class fixes, for
both sides at once, what purerpc gets wrong on the wire. Today that is the ``grpc-message``
trailer: purerpc escapes every reserved character (``:`` becomes ``%3A``), which Node clients
show undecoded; here it is encoded exactly as the gRPC HTTP/2 protocol says, and decoded
leniently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import h2.events
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import ResponseEnded
from purerpc.grpclib.headers import sanitize_headers
from purerpc.grpclib.status import Status

from jobworker.wire.status import decode_grpc_message, encode_grpc_message

__all__ = ["WireConnection"]


class WireConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's gRPC connection with the status trailers encoded and decoded correctly."""

    h2_connection: Any

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
