"""The shared connection core, driven in-process: frames in, frames out, no sockets."""

from __future__ import annotations

import h2.events
import h2.settings
import pytest
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived, ResponseEnded
from purerpc.grpclib.status import Status, StatusCode

from jobworker.wire.connection import WireConnection


def exchange(sender: WireConnection, receiver: WireConnection) -> list[object]:
    events: list[object] = receiver.receive_data(sender.data_to_send())
    return events


def connected_pair() -> tuple[WireConnection, WireConnection]:
    client = WireConnection(GRPCConfiguration(client_side=True))
    server = WireConnection(GRPCConfiguration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    exchange(client, server)
    exchange(server, client)
    exchange(client, server)
    return client, server


def start_call(client: WireConnection, server: WireConnection) -> int:
    stream_id: int = client.get_next_available_stream_id()
    client.start_request(
        stream_id, "https", "job_worker.JobService", "StopJob", authority="localhost"
    )
    (received,) = exchange(client, server)
    assert isinstance(received, RequestReceived)
    return stream_id


MESSAGE = "job is not running: 1 (current status: FAILED) h\u00e9llo 100%"
ON_THE_WIRE = "job is not running: 1 (current status: FAILED) h%C3%A9llo 100%25"


@pytest.mark.parametrize("after_messages", [False, True])
def test_status_messages_are_encoded_as_the_protocol_says(after_messages: bool) -> None:
    client, server = connected_pair()
    stream_id = start_call(client, server)
    status = Status(StatusCode.FAILED_PRECONDITION, MESSAGE)
    if after_messages:
        server.start_response(stream_id)
        server.end_response(stream_id, status)
    else:
        server.respond_status(stream_id, status)
    frames = server.data_to_send()
    # the client's h2 layer alone (no gRPC decoding) shows the header value as sent
    events = client.h2_connection.receive_data(frames)
    headers = [
        dict(event.headers)
        for event in events
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived)
    ]
    assert headers[-1]["grpc-message"] == ON_THE_WIRE
    assert headers[-1]["grpc-status"] == str(StatusCode.FAILED_PRECONDITION.value)


@pytest.mark.parametrize("after_messages", [False, True])
def test_the_peer_reads_back_the_exact_message(after_messages: bool) -> None:
    client, server = connected_pair()
    stream_id = start_call(client, server)
    status = Status(StatusCode.NOT_FOUND, MESSAGE)
    if after_messages:
        server.start_response(stream_id)
        server.end_response(stream_id, status)
    else:
        server.respond_status(stream_id, status)
    ended = [event for event in exchange(server, client) if isinstance(event, ResponseEnded)]
    assert len(ended) == 1
    assert ended[0].status.status_code == StatusCode.NOT_FOUND
    assert ended[0].status.status_message == MESSAGE


def test_an_invalid_escape_from_a_peer_is_kept_as_it_is() -> None:
    client, server = connected_pair()
    stream_id = start_call(client, server)
    server.h2_connection.send_headers(
        stream_id,
        [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "13"),
            ("grpc-message", "disk 100% full %zz %E9"),
        ],
        end_stream=True,
    )
    (ended,) = [event for event in exchange(server, client) if isinstance(event, ResponseEnded)]
    assert ended.status.status_message == "disk 100% full %zz \ufffd"


def test_the_ready_made_headers_and_ok_trailers_read_back_exactly_between_others() -> None:
    """The precomputed blocks leave the peer's dynamic table as the real encoder expects:
    calls that mix them with freshly encoded headers all decode to what was sent."""
    client, server = connected_pair()
    seen: list[list[tuple[str, str]]] = []
    for n in range(4):
        stream_id = start_call(client, server)
        server.start_response(stream_id)
        if n % 2:
            server.end_response(stream_id, Status(StatusCode.OK))
        else:  # a message of its own: enters the dynamic tables of both sides
            server.end_response(stream_id, Status(StatusCode.ABORTED, f"try again {n}"))
        for event in client.h2_connection.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                seen.append([(str(k), str(v)) for k, v in event.headers])
    assert seen[0] == [(":status", "200"), ("content-type", "application/grpc")]
    assert seen[1] == [("grpc-status", "10"), ("grpc-message", "try again 0")]
    assert seen[3] == [("grpc-status", "0")]
    assert seen[5] == [("grpc-status", "10"), ("grpc-message", "try again 2")]
    assert seen[7] == [("grpc-status", "0")]
    assert all(block == seen[0] for block in seen[::2])


def test_a_pending_table_size_change_is_written_by_the_real_encoder() -> None:
    """After the peer shrinks its header table, the next block must open with the size
    update (RFC 7541 4.2): the ready-made block steps aside for it once."""
    client, server = connected_pair()
    client.h2_connection.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    exchange(client, server)
    exchange(server, client)  # the server's SETTINGS ack
    stream_id = start_call(client, server)
    server.start_response(stream_id)
    data = server.data_to_send()
    # HEADERS frame: 9-byte frame header, then the block; 0x20 = "table size update to 0"
    assert data[9] == 0x20
    events = client.h2_connection.receive_data(data)
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
    server.end_response(stream_id, Status(StatusCode.OK))
    stream_two = start_call(client, server)
    server.start_response(stream_two)
    data = server.data_to_send()
    assert data[9] != 0x20  # the change was written once; the ready-made block is back
    client.h2_connection.receive_data(data)
