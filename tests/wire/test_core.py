"""The wire core both sides drive: limits, the writer discipline, flow control, refusals.

Frames in, frames out, in-process: a server core (ServerGRPCConnection with its limits)
against a client core built from the same pieces the client uses, and the Trio writer
against a send function the test controls. No sockets.
"""

from __future__ import annotations

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestReceived, WindowUpdated
from purerpc.grpclib.exceptions import MessageTooLargeError

from jobworker.errors import leaves
from jobworker.server.config import ConnectionLimits
from jobworker.server.transport import BadRequestMessage, ServerGRPCConnection
from jobworker.wire.connection import WireConnection
from jobworker.wire.core import (
    CLIENT_LIMITS,
    GRPC_MESSAGE_PREFIX,
    Outbound,
    OutgoingMessage,
    WireLimits,
    apply_limits,
    initiate,
    send_step,
)
from jobworker.wire.trio_io import FlowGates, MessageSender, Writer


class ClientCore(WireConnection):
    """A client core with the given limits, as jobworker.client.connection builds its own."""

    limits = CLIENT_LIMITS

    def _set_h2_connection_local_settings(self) -> None:
        apply_limits(self.h2_connection, type(self).limits, client_side=True)

    def initiate_connection(self) -> None:
        initiate(self.h2_connection, type(self).limits)


def client_with(limits: WireLimits) -> WireConnection:
    cls = type("LimitedClient", (ClientCore,), {"limits": limits})
    client: WireConnection = cls(GRPCConfiguration(client_side=True))
    return client


def move(sender: WireConnection, receiver: WireConnection) -> list[object]:
    events: list[object] = receiver.receive_data(sender.data_to_send())
    return events


def pair(
    server_limits: WireLimits, client_limits: WireLimits = CLIENT_LIMITS
) -> tuple[WireConnection, ServerGRPCConnection]:
    client = client_with(client_limits)
    server = ServerGRPCConnection(
        GRPCConfiguration(client_side=False, max_message_length=server_limits.max_message_bytes),
        server_limits,
    )
    client.initiate_connection()
    server.initiate_connection()
    move(client, server)
    move(server, client)
    move(client, server)
    return client, server


def open_stream(client: WireConnection, server: ServerGRPCConnection) -> tuple[int, list[object]]:
    stream_id: int = client.get_next_available_stream_id()
    client.start_request(stream_id, "https", "job_worker.JobService", "GetJob", authority="h")
    return stream_id, move(client, server)


def framed(payload: bytes, limit: int = 1 << 20) -> OutgoingMessage:
    return OutgoingMessage(payload, limit)


def test_each_side_advertises_its_limits_and_opens_its_connection_window() -> None:
    limits = WireLimits(max_message_bytes=100_000, max_concurrent_streams=3)
    client, server = pair(limits)
    seen_by_client = client.h2_connection.remote_settings
    assert seen_by_client.max_concurrent_streams == 3
    assert seen_by_client.initial_window_size == 100_000 + GRPC_MESSAGE_PREFIX
    assert seen_by_client.max_frame_size == 16_384
    assert seen_by_client.max_header_list_size == 8_192
    assert client.h2_connection.outbound_flow_control_window == limits.connection_window
    assert limits.connection_window == 2 * (100_000 + GRPC_MESSAGE_PREFIX)
    seen_by_server = server.h2_connection.remote_settings
    assert seen_by_server.initial_window_size == CLIENT_LIMITS.stream_window
    assert seen_by_server.max_frame_size == CLIENT_LIMITS.max_frame_size
    assert server.h2_connection.outbound_flow_control_window == 2**30


def test_the_servers_flags_become_its_wire_limits() -> None:
    wire = ConnectionLimits(max_concurrent_streams=7, max_message_bytes=512).wire
    assert (wire.max_concurrent_streams, wire.max_message_bytes) == (7, 512)
    assert wire.stream_window == 512 + GRPC_MESSAGE_PREFIX


def test_a_message_goes_out_as_far_as_the_window_allows_then_resumes_on_update() -> None:
    # The client can take 100 bytes per stream ahead of its reading.
    client, server = pair(WireLimits(), client_limits=WireLimits(max_message_bytes=95))
    stream_id, _ = open_stream(client, server)
    server.start_response(stream_id)
    payload = bytes(range(256)) + b"x" * 44  # 300 bytes, 305 framed
    buffer = framed(payload)
    assert send_step(server, stream_id, buffer)
    assert not send_step(server, stream_id, buffer)  # the window is shut: nothing sent
    assert len(buffer) == 305 - 100
    received = b""
    rounds = 0
    while True:
        # The client's h2 itself: purerpc acknowledges only whole messages.
        for event in client.h2_connection.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                client.h2_connection.acknowledge_received_data(
                    event.flow_controlled_length, stream_id
                )
        if not buffer:
            break
        updates = move(client, server)
        assert any(isinstance(e, WindowUpdated) for e in updates)
        while send_step(server, stream_id, buffer) and buffer:
            pass
        rounds += 1
        assert rounds < 10
    assert received[GRPC_MESSAGE_PREFIX:] == payload


def test_an_excess_stream_is_refused_alone() -> None:
    client = client_with(CLIENT_LIMITS)
    limits = WireLimits(max_concurrent_streams=1)
    server = ServerGRPCConnection(GRPCConfiguration(client_side=False), limits)
    client.initiate_connection()
    server.initiate_connection()
    move(client, server)  # the client has not seen our limit yet: it opens two streams
    first, events = open_stream(client, server)
    assert any(isinstance(e, RequestReceived) for e in events)
    second, events = open_stream(client, server)
    assert not any(isinstance(e, RequestReceived) for e in events)
    raw = client.h2_connection.receive_data(server.data_to_send())
    resets = [e for e in raw if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [
        (second, h2.errors.ErrorCodes.REFUSED_STREAM)
    ]
    client.send_data(first, bytes(framed(b"hi").take(7)), end_stream=True)
    assert any(isinstance(e, MessageReceived) for e in move(client, server))


def test_an_oversized_request_ends_its_stream_and_nothing_of_it_is_buffered() -> None:
    client, server = pair(WireLimits(max_message_bytes=100))
    stream_id, _ = open_stream(client, server)
    header = (0).to_bytes(1, "big") + (5000).to_bytes(4, "big")  # announces 5000 bytes
    client.send_data(stream_id, header + b"x" * 50)
    (bad,) = move(client, server)
    assert isinstance(bad, BadRequestMessage)
    assert bad.message == "request message too large: 5000 bytes (limit 100)"
    assert stream_id not in server.message_read_buffers
    # The connection lives on: the window was given back, another stream works.
    other, events = open_stream(client, server)
    assert any(isinstance(e, RequestReceived) and e.stream_id == other for e in events)


def test_outbound_counts_what_the_writer_holds_until_the_kernel_took_it() -> None:
    client, server = pair(WireLimits())
    del client
    outbound = Outbound(server.h2_connection, WireLimits(outbound_high_water=100, write_chunk=40))
    server.h2_connection.ping(b"12345678")  # 17 bytes
    server.h2_connection.ping(b"abcdefgh")
    queued = outbound.pending()
    assert queued == 34
    assert outbound.writable()
    chunk = outbound.take()
    assert len(chunk) == 34
    assert outbound.pending() == 34  # in flight: still ours until sent()
    outbound.sent()
    assert outbound.pending() == 0
    for _ in range(6):
        server.h2_connection.ping(b"00000000")
    assert not outbound.writable()  # 102 bytes queued, the high water is 100


class ControlledSend:
    """A socket send the test holds open until it lets it go."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[bytes] = []
        self.release = trio.Event()
        self.fail = fail

    async def __call__(self, data: bytes) -> None:
        await self.release.wait()
        if self.fail:
            raise trio.BrokenResourceError("peer gone")
        self.sent.append(bytes(data))


async def test_a_sender_waits_while_the_writer_holds_too_much_and_close_drains() -> None:
    client, server = pair(WireLimits())
    del client
    limits = WireLimits(outbound_high_water=64, write_chunk=1 << 20)
    send = ControlledSend()
    writer = Writer(Outbound(server.h2_connection, limits), send)
    for _ in range(5):
        server.h2_connection.ping(b"00000000")  # 85 bytes
    waited = trio.Event()

    async def sender() -> None:
        await writer.wait_writable()
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        nursery.start_soon(sender)
        writer.kick()
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()  # 85 bytes held by the writer, in flight
        send.release.set()
        with trio.fail_after(5):
            await waited.wait()
        server.h2_connection.ping(b"11111111")
        writer.close()
    assert b"".join(send.sent).endswith(b"11111111")  # close() sent what was queued


async def test_a_failed_send_ends_the_writer_and_frees_whoever_waits() -> None:
    client, server = pair(WireLimits())
    del client
    send = ControlledSend(fail=True)
    writer = Writer(Outbound(server.h2_connection, WireLimits(outbound_high_water=16)), send)
    server.h2_connection.ping(b"00000000")
    freed = trio.Event()

    async def sender() -> None:
        await writer.wait_writable()
        freed.set()

    async def run_both() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            send.release.set()
            await writer.run()

    with pytest.raises(ExceptionGroup) as caught:
        await run_both()
    assert [type(e) for e in leaves(caught.value)] == [trio.BrokenResourceError]
    assert freed.is_set()


async def test_a_connection_window_update_wakes_every_stream_a_stream_update_one() -> None:
    gates = FlowGates()
    woken: list[int] = []

    async def waiter(stream_id: int) -> None:
        await gates.wait(stream_id)
        woken.append(stream_id)

    async with trio.open_nursery() as nursery:
        for stream_id in (1, 3, 5):
            nursery.start_soon(waiter, stream_id)
        await trio.testing.wait_all_tasks_blocked()
        gates.opened(3)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [3]
        gates.opened(0)
    assert sorted(woken) == [1, 3, 5]


async def test_the_sender_gives_up_on_an_abandoned_call_blocked_on_flow_control() -> None:
    client, server = pair(WireLimits(), client_limits=WireLimits(max_message_bytes=10))
    stream_id, _ = open_stream(client, server)
    server.start_response(stream_id)
    send = ControlledSend()
    send.release.set()
    writer = Writer(Outbound(server.h2_connection, WireLimits()), send)
    gates = FlowGates()
    sender = MessageSender(server, writer, gates, 1 << 20)
    abandoned = False
    outcome: list[bool] = []

    async def send_one() -> None:
        outcome.append(await sender.send(stream_id, b"y" * 100, abandoned=lambda: abandoned))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        nursery.start_soon(send_one)
        await trio.testing.wait_all_tasks_blocked()
        assert not outcome  # blocked: 15 of 105 bytes fit the client's window
        abandoned = True
        gates.open_all()
        await trio.testing.wait_all_tasks_blocked()
        writer.close()
    assert outcome == [False]


@pytest.mark.parametrize("window", [1, 3, 5, 6, 16_384])
def test_a_message_is_handed_out_as_its_prefix_and_payload_whatever_the_pieces(
    window: int,
) -> None:
    payload = bytes(range(256)) * 7
    message = OutgoingMessage(payload, 1 << 20)
    pieces = b""
    while message:
        pieces += bytes(message.take(window))
    assert pieces == (0).to_bytes(1, "big") + len(payload).to_bytes(4, "big") + payload


def test_a_message_over_the_limit_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(MessageTooLargeError):
        OutgoingMessage(b"x" * 101, 100)
