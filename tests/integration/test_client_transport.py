"""The client's transport against a scripted HTTP/2 server: the purerpc defects it must fix.

The scripted server (``FakeServer``) speaks TLS 1.3 + HTTP/2 with ``h2`` directly and records
what the client sends, so each test can prove a wire-level fact: RST_STREAM(CANCEL) on a
cancelled call, grpc-timeout on unary calls, the socket closed when the client exits, a
dropped connection waking every call, a refused certificate reported instead of a hang.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
from hyperframe.frame import GoAwayFrame

from jobworker import pki
from jobworker.api import worker_pb2
from jobworker.cli import main as cli_main
from jobworker.client import (
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    JobClient,
    RpcError,
    ServerShuttingDown,
    open_client,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import TestPKI

WAIT_S = 5.0  # upper bound for anything that should happen "promptly"


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">?I", False, len(message)) + message


@dataclass
class ServerCall:
    """One request as the fake server saw it."""

    stream_id: int
    headers: dict[str, str]
    request: bytes = b""
    reset_code: int | None = None
    reset: trio.Event = field(default_factory=trio.Event)


Handler = Callable[["FakeConnection", ServerCall], Awaitable[None]]


class FakeConnection:
    """Server side of one client connection."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], server: FakeServer) -> None:
        self.stream = stream
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.calls: dict[int, ServerCall] = {}
        self.send_lock = trio.Lock()
        self.window = trio.Event()
        self.eof = trio.Event()
        self.goaway = False
        self.aborted = False

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def respond(
        self, call: ServerCall, *messages: bytes, code: int = 0, text: str = ""
    ) -> None:
        self.h2.send_headers(
            call.stream_id, [(":status", "200"), ("content-type", "application/grpc+proto")]
        )
        for message in messages:
            await self.send_data(call, grpc_frame(message))
        await self.end(call, code, text)

    async def send_data(self, call: ServerCall, data: bytes) -> None:
        view = memoryview(data)
        while view:
            window = min(
                self.h2.local_flow_control_window(call.stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                await self.window.wait()
                self.window = trio.Event()
                continue
            self.h2.send_data(call.stream_id, bytes(view[:window]))
            view = view[window:]
            await self.flush()

    async def end(self, call: ServerCall, code: int, text: str = "") -> None:
        trailers = [("grpc-status", str(code))]
        if text:
            trailers.append(("grpc-message", urllib.parse.quote(text, safe="")))
        self.h2.send_headers(call.stream_id, trailers, end_stream=True)
        await self.flush()

    async def trailers_only(self, call: ServerCall, code: int, text: str) -> None:
        headers = [
            (":status", "200"),
            ("content-type", "application/grpc+proto"),
            ("grpc-status", str(code)),
            ("grpc-message", urllib.parse.quote(text, safe="")),
        ]
        self.h2.send_headers(call.stream_id, headers, end_stream=True)
        await self.flush()

    async def abort(self) -> None:
        """Drop the TCP connection without any HTTP/2 or TLS goodbye (a crashed server)."""
        self.aborted = True
        await trio.aclose_forcefully(self.stream.transport_stream)

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        bodies: dict[int, bytearray] = {}
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.eof.set()
                    nursery.cancel_scope.cancel()
                    return
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        call = ServerCall(event.stream_id, headers)
                        self.calls[event.stream_id] = call
                        self.server.calls.append(call)
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        call = self.calls[event.stream_id]
                        call.request = bytes(bodies.pop(event.stream_id)[5:])
                        nursery.start_soon(self.server.handler, self, call)
                    elif isinstance(event, h2.events.StreamReset):
                        call = self.calls[event.stream_id]
                        call.reset_code = event.error_code
                        call.reset.set()
                    elif isinstance(event, h2.events.WindowUpdated):
                        self.window.set()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = True
                if not self.aborted:
                    await self.flush()


class FakeServer:
    """A TLS 1.3 HTTP/2 server that runs ``handler`` for each request and records everything."""

    def __init__(self, test_pki: TestPKI, handler: Handler, *, send_settings: bool = True):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cafile=str(test_pki.ca_cert))
        self.context.load_cert_chain(test_pki.cert("server"), test_pki.key("server"))
        self.context.set_alpn_protocols(["h2"])
        self.handler = handler
        self.send_settings = send_settings
        self.calls: list[ServerCall] = []
        self.connections: list[FakeConnection] = []
        self.handshake_errors: list[str] = []
        self.connected = trio.Event()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                tcp = await listeners[0].accept()
                nursery.start_soon(self._connection, tcp)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        try:
            await stream.do_handshake()
            if not self.send_settings:
                self.connected.set()
                await trio.sleep_forever()
            connection = FakeConnection(stream, self)
            self.connections.append(connection)
            self.connected.set()
            await connection.run()
        except trio.BrokenResourceError as exc:
            self.handshake_errors.append(repr(exc.__cause__))
        finally:
            await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def fake_server(
    test_pki: TestPKI, handler: Handler, *, send_settings: bool = True
) -> AsyncIterator[FakeServer]:
    server = FakeServer(test_pki, handler, send_settings=send_settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def client_for(
    test_pki: TestPKI, address: str, stem: str = "admin-client", **kwargs: float
) -> contextlib.AbstractAsyncContextManager[JobClient]:
    return open_client(
        address, cert=test_pki.cert(stem), key=test_pki.key(stem), ca=test_pki.ca_cert, **kwargs
    )


async def wait_for(event: trio.Event, what: str) -> None:
    with trio.move_on_after(WAIT_S):
        await event.wait()
        return
    pytest.fail(f"timed out waiting for {what}")


def job_res(job_id: str) -> bytes:
    return worker_pb2.GetJobRes(id=job_id, command="echo", status="RUNNING").SerializeToString()


async def answer_get(conn: FakeConnection, call: ServerCall) -> None:
    request = worker_pb2.GetJobReq.FromString(call.request)
    if request.id == "999":
        await conn.trailers_only(call, 5, "job not found: 999")
    else:
        await conn.respond(call, job_res(request.id))


async def never_answer(conn: FakeConnection, call: ServerCall) -> None:
    await trio.sleep_forever()


async def test_unary_call_sends_deadline_and_parses_response(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, answer_get) as server:
        async with client_for(test_pki, server.address, call_timeout=7.5) as client:
            job = await client.get("12")
        assert job.id == "12"
        assert job.status == "RUNNING"
        headers = server.calls[0].headers
        assert headers[":path"] == "/job_worker.JobService/GetJob"
        assert headers[":scheme"] == "https"
        assert headers[":authority"] == server.address
        assert headers["grpc-timeout"] == "7500000u"
        assert headers["te"] == "trailers"


async def test_error_status_becomes_rpc_error_with_the_servers_words(test_pki: TestPKI) -> None:
    async with (
        fake_server(test_pki, answer_get) as server,
        client_for(test_pki, server.address) as client,
    ):
        with pytest.raises(RpcError) as caught:
            await client.get("999")
        assert caught.value.code_name == "NOT_FOUND"
        assert str(caught.value) == "job not found: 999"
        # The connection is still good after an error status.
        assert (await client.get("1")).id == "1"


async def test_cli_exits_3_when_a_call_gets_no_answer_within_the_timeout(
    test_pki: TestPKI, capfd: pytest.CaptureFixture[str]
) -> None:
    async with fake_server(test_pki, never_answer) as server:
        argv = [
            *("--server", server.address, "--timeout", "0.5"),
            *("--cert", str(test_pki.cert("admin-client"))),
            *("--key", str(test_pki.key("admin-client"))),
            *("--ca", str(test_pki.ca_cert), "get", "1"),
        ]
        code = await trio.to_thread.run_sync(cli_main, argv)  # the CLI runs its own trio.run
        await wait_for(server.calls[0].reset, "RST_STREAM")
    out, err = capfd.readouterr()
    assert (code, out) == (3, "")
    assert err == "Error: deadline exceeded: no answer within 0.5 s\n"
    assert server.calls[0].headers["grpc-timeout"] == "500000u"


async def test_unary_deadline_resets_the_stream(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, never_answer) as server:
        async with client_for(test_pki, server.address, call_timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                await client.get("1")
            elapsed = time.monotonic() - started
            assert caught.value.code_name == "DEADLINE_EXCEEDED"
            await wait_for(server.calls[0].reset, "RST_STREAM after the deadline")
        assert 0.3 <= elapsed < 2.0
        assert server.calls[0].reset_code == h2.errors.ErrorCodes.CANCEL
        assert server.calls[0].headers["grpc-timeout"] == "300000u"


async def stream_forever(conn: FakeConnection, call: ServerCall) -> None:
    conn.h2.send_headers(call.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
    for n in range(1_000_000):
        if call.reset_code is not None:
            return
        chunk = worker_pb2.DataChunk(payload=f"line {n}\n".encode()).SerializeToString()
        await conn.send_data(call, grpc_frame(chunk))
        await trio.sleep(0.01)


async def test_exiting_the_client_resets_a_stream_left_open(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, stream_forever) as server:
        async with client_for(test_pki, server.address) as client:
            output = client.stream("1")
            await output.__aenter__()  # never exited: the client must reset it anyway
            assert await output.__anext__() == b"line 0\n"
        await wait_for(server.calls[0].reset, "RST_STREAM")
        assert server.calls[0].reset_code == h2.errors.ErrorCodes.CANCEL
        await wait_for(server.connections[0].eof, "the socket to close")
        assert not server.connections[0].goaway  # see Connection.close_gracefully


async def test_leaving_a_stream_early_sends_rst_stream_cancel(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, stream_forever) as server:
        async with client_for(test_pki, server.address) as client, client.stream("1") as output:
            received = [await output.__anext__() for _ in range(3)]
            # still inside the client: the reset must not wait for the connection to close
        assert received == [b"line 0\n", b"line 1\n", b"line 2\n"]
        await wait_for(server.calls[0].reset, "RST_STREAM")
        assert server.calls[0].reset_code == h2.errors.ErrorCodes.CANCEL
        assert "grpc-timeout" not in server.calls[0].headers  # streams have no deadline


async def test_cancelling_a_stream_resets_it_while_the_connection_stays_open(
    test_pki: TestPKI,
) -> None:
    async with (
        fake_server(test_pki, stream_forever) as server,
        client_for(test_pki, server.address) as client,
    ):
        with trio.move_on_after(0.2):
            async with client.stream("1") as output:
                async for _ in output:
                    pass
        await wait_for(server.calls[0].reset, "RST_STREAM after cancellation")
        assert server.calls[0].reset_code == h2.errors.ErrorCodes.CANCEL
        assert not server.connections[0].eof.is_set()


async def test_exiting_the_client_closes_the_socket(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, answer_get) as server:
        async with client_for(test_pki, server.address) as client:
            await client.get("1")
        await wait_for(server.connections[0].eof, "the socket to close")
        with pytest.raises(ConnectionLost):
            await client.get("1")


async def test_an_exception_leaving_the_client_block_is_raised_bare(test_pki: TestPKI) -> None:
    """The block runs inside the connection's nursery, yet its exception is not wrapped in a
    group, and the connection is closed as on a normal exit."""

    class BodyFailed(Exception):
        pass

    async def use_client(address: str) -> None:
        async with client_for(test_pki, address) as client:
            await client.get("1")
            raise BodyFailed("from the body")

    async with fake_server(test_pki, answer_get) as server:
        with pytest.raises(BodyFailed) as caught:
            await use_client(server.address)
        assert type(caught.value) is BodyFailed
        await wait_for(server.connections[0].eof, "the socket to close")


async def test_a_cancelled_client_block_closes_the_connection(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, stream_forever) as server:
        with trio.move_on_after(0.2) as scope:
            async with client_for(test_pki, server.address) as client, client.stream("1") as out:
                async for _ in out:
                    pass
        assert scope.cancelled_caught
        await wait_for(server.calls[0].reset, "RST_STREAM")
        await wait_for(server.connections[0].eof, "the socket to close")


async def drop_after_two_chunks(conn: FakeConnection, call: ServerCall) -> None:
    conn.h2.send_headers(call.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
    for n in range(2):
        chunk = worker_pb2.DataChunk(payload=b"%d" % n).SerializeToString()
        await conn.send_data(call, grpc_frame(chunk))
    await trio.sleep(0.05)
    await conn.abort()


async def test_server_dropping_mid_stream_raises_connection_lost_promptly(
    test_pki: TestPKI,
) -> None:
    received: list[bytes] = []

    async def drain(client: JobClient) -> None:
        async with client.stream("1") as output:
            async for chunk in output:
                received.append(chunk)

    async with (
        fake_server(test_pki, drop_after_two_chunks) as server,
        client_for(test_pki, server.address) as client,
    ):
        started = time.monotonic()
        with pytest.raises(ConnectionLost) as caught:
            await drain(client)
        assert time.monotonic() - started < 2.0
        assert received == [b"0", b"1"]  # what arrived before the drop is delivered
        assert str(caught.value) == "connection lost"
        with pytest.raises(ConnectionLost):  # and later calls fail at once
            await client.get("1")


async def test_dropped_connection_wakes_every_call_in_progress(test_pki: TestPKI) -> None:
    async def hang_then_drop(conn: FakeConnection, call: ServerCall) -> None:
        if len(server.calls) == 3:
            await conn.abort()
        await trio.sleep_forever()

    async with fake_server(test_pki, hang_then_drop) as server:
        errors: list[BaseException] = []
        async with client_for(test_pki, server.address, call_timeout=30) as client:

            async def call(job_id: str) -> None:
                try:
                    await client.get(job_id)
                except ConnectionLost as exc:
                    errors.append(exc)

            with trio.fail_after(WAIT_S):
                async with trio.open_nursery() as nursery:
                    for n in range(3):
                        nursery.start_soon(call, str(n))
        assert len(errors) == 3


async def test_big_stream_arrives_whole_through_flow_control(test_pki: TestPKI) -> None:
    size = 20 * 1024 * 1024  # larger than the client's 8 MiB per-stream window
    piece = bytes(range(256)) * 256  # 64 KiB

    async def big(conn: FakeConnection, call: ServerCall) -> None:
        conn.h2.send_headers(
            call.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
        )
        for _ in range(size // len(piece)):
            await conn.send_data(
                call, grpc_frame(worker_pb2.DataChunk(payload=piece).SerializeToString())
            )
        await conn.end(call, 0)

    async with fake_server(test_pki, big) as server, client_for(test_pki, server.address) as client:
        total = 0
        async with client.stream("1") as output:
            async for chunk in output:
                assert chunk == piece
                total += len(chunk)
        assert total == size


async def test_concurrent_calls_share_one_connection(test_pki: TestPKI) -> None:
    async with (
        fake_server(test_pki, answer_get) as server,
        client_for(test_pki, server.address) as client,
    ):
        results: dict[str, str] = {}

        async def get(job_id: str) -> None:
            results[job_id] = (await client.get(job_id)).id

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(get, str(n))
        assert results == {str(n): str(n) for n in range(50)}
        assert len(server.connections) == 1


async def test_nothing_listening_is_cannot_connect(test_pki: TestPKI) -> None:
    with trio.socket.socket() as sock:  # a port that is surely closed: bound, never listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConnectError) as caught:
            async with client_for(test_pki, f"127.0.0.1:{port}"):
                pass
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: connection refused"


async def test_silent_tcp_server_times_out_the_connect(test_pki: TestPKI) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            async with client_for(test_pki, f"127.0.0.1:{port}", connect_timeout=0.3):
                pass
        assert time.monotonic() - started < 2.0
        assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: no answer within 0.3 s"
    finally:
        await listeners[0].aclose()


async def test_server_without_settings_times_out_the_connect(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, answer_get, send_settings=False) as server:
        with pytest.raises(ConnectError, match=r"no answer within 0\.3 s"):
            async with client_for(test_pki, server.address, connect_timeout=0.3):
                pass
        assert server.connected.is_set()  # the TLS handshake itself had succeeded


@pytest.mark.parametrize("stem", ["foreign-client", "expired-client"])
async def test_refused_client_certificate_is_reported_not_hung(
    test_pki: TestPKI, stem: str
) -> None:
    # A Trio (or AnyIO) server does not flush its TLS alert: under TLS 1.3 the
    # client sees its handshake succeed, then EOF before the server's SETTINGS.
    async with fake_server(test_pki, answer_get) as server:
        started = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            async with client_for(test_pki, server.address, stem=stem):
                pass
        assert time.monotonic() - started < 2.0
        assert str(caught.value) == (
            "TLS handshake refused by server: connection closed before the session started"
            f" (is the client certificate {test_pki.cert(stem)} valid and signed by the"
            " server's CA?)"
        )
        assert len(server.handshake_errors) == 1  # the server did refuse it


def blocking_tls_server(test_pki: TestPKI, listener: socket.socket) -> str:
    """Accept one connection with the stdlib's blocking TLS, which does send its alerts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(test_pki.ca_cert))
    context.load_cert_chain(test_pki.cert("server"), test_pki.key("server"))
    conn, _ = listener.accept()
    conn.settimeout(WAIT_S)
    tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except ssl.SSLError as exc:
        # The alert is out. Linger until the client has read it and hung up: closing
        # with its bytes unread would send a TCP reset, which can overtake the alert.
        with socket.socket(fileno=tls.detach()) as raw, contextlib.suppress(OSError):
            raw.settimeout(WAIT_S)
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
        return exc.reason or "?"
    tls.close()
    return "accepted"


@pytest.mark.parametrize(
    ("stem", "reason"),
    [("foreign-client", "unknown CA"), ("expired-client", "certificate expired")],
)
async def test_refusal_alert_names_the_reason(test_pki: TestPKI, stem: str, reason: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            verdict: list[str] = []

            async def serve() -> None:
                verdict.append(
                    await trio.to_thread.run_sync(blocking_tls_server, test_pki, listener)
                )

            nursery.start_soon(serve)
            with pytest.raises(ConnectError) as caught:
                async with client_for(
                    test_pki, f"127.0.0.1:{port}", stem=stem, connect_timeout=WAIT_S
                ):
                    pass
    assert verdict == ["CERTIFICATE_VERIFY_FAILED"]
    assert str(caught.value) == f"the server refused our certificate: {reason}"


async def test_server_certificate_from_another_ca_fails_verification(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    other = pki.Authority.create("someone else")
    (tmp_path / "other-ca.pem").write_bytes(other.cert_pem)
    async with fake_server(test_pki, answer_get) as server:
        with pytest.raises(ConnectError) as caught:
            async with open_client(
                server.address,
                cert=test_pki.cert("admin-client"),
                key=test_pki.key("admin-client"),
                ca=tmp_path / "other-ca.pem",
            ):
                pass
    # OpenSSL's words depend on whether the server sends its chain; the prefix is ours.
    assert str(caught.value).startswith("certificate verify failed: ")
    assert "certificate" in str(caught.value).removeprefix("certificate verify failed: ")


async def test_missing_certificate_file_is_named(test_pki: TestPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nope-cert.pem"
    with pytest.raises(ConnectError) as caught:
        async with open_client(
            "127.0.0.1:1", cert=missing, key=test_pki.key("admin-client"), ca=test_pki.ca_cert
        ):
            pass
    assert str(caught.value) == f"missing certificate file at {missing}"


async def test_invalid_server_address_is_a_connect_error(test_pki: TestPKI) -> None:
    with pytest.raises(ConnectError, match="port must be 1-65535"):
        async with client_for(test_pki, "localhost:http"):
            pass


async def test_client_is_usable_as_a_plain_job_client(test_pki: TestPKI) -> None:
    async with (
        fake_server(test_pki, answer_get) as server,
        client_for(test_pki, server.address) as client,
    ):
        assert isinstance(client, JobClient)
        assert str(client.address) == server.address


@pytest.mark.parametrize(
    ("error_code", "code_name"),
    [
        (h2.errors.ErrorCodes.CANCEL, "CANCELLED"),
        (h2.errors.ErrorCodes.REFUSED_STREAM, "UNAVAILABLE"),
        (h2.errors.ErrorCodes.INTERNAL_ERROR, "INTERNAL"),
    ],
)
async def test_stream_reset_by_the_server_ends_the_call(
    test_pki: TestPKI, error_code: int, code_name: str
) -> None:
    async def reset(conn: FakeConnection, call: ServerCall) -> None:
        conn.h2.reset_stream(call.stream_id, error_code)
        await conn.flush()

    async with (
        fake_server(test_pki, reset) as server,
        client_for(test_pki, server.address, call_timeout=WAIT_S) as client,
    ):
        with pytest.raises(RpcError) as caught:
            await client.get("1")
        assert caught.value.code_name == code_name
        assert "Traceback" not in str(caught.value)


async def test_call_ended_without_a_status_is_an_internal_error(test_pki: TestPKI) -> None:
    async def no_trailers(conn: FakeConnection, call: ServerCall) -> None:
        conn.h2.send_headers(
            call.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
        )
        conn.h2.send_data(call.stream_id, grpc_frame(job_res("1")), end_stream=True)
        await conn.flush()

    async with (
        fake_server(test_pki, no_trailers) as server,
        client_for(test_pki, server.address, call_timeout=WAIT_S) as client,
    ):
        with pytest.raises(RpcError) as caught:
            await client.get("1")
        assert caught.value.code_name == "INTERNAL"
        assert str(caught.value) == "the server ended the call without a status"


async def test_goaway_refuses_new_calls_and_fails_calls_it_did_not_take(
    test_pki: TestPKI,
) -> None:
    async def goaway_on_second(conn: FakeConnection, call: ServerCall) -> None:
        if call.stream_id == 3:  # the client's second call: keep only the first
            # As our server sends it: the bare frame, so that this side's h2 stays open for
            # the stream it keeps (stock h2 closes the connection on close_connection()).
            conn.h2._prepare_for_sending([GoAwayFrame(stream_id=0, last_stream_id=1)])
            await conn.flush()
        await trio.sleep_forever()

    async with (
        fake_server(test_pki, goaway_on_second) as server,
        client_for(test_pki, server.address, call_timeout=WAIT_S) as client,
    ):
        failures: list[str] = []

        async def call(job_id: str) -> None:
            with contextlib.suppress(DeadlineExceeded):
                try:
                    await client.get(job_id)
                except (ConnectionLost, ServerShuttingDown) as exc:
                    failures.append(f"{job_id}: {exc}")

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "first")
                await wait_for_calls(server, 1)
                nursery.start_soon(call, "second")
                await wait_for_calls(server, 2)
                with trio.fail_after(WAIT_S):
                    while not failures:
                        await trio.sleep(0.01)
                assert failures == ["second: server shutting down"]
                with pytest.raises(ConnectionLost):
                    await client.get("third")
                nursery.cancel_scope.cancel()


async def stream_then(conn: FakeConnection, call: ServerCall, ending: str) -> None:
    """Two chunks, then the server goes away the way ``ending`` says."""
    conn.h2.send_headers(call.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
    for n in range(2):
        chunk = worker_pb2.DataChunk(payload=b"%d" % n).SerializeToString()
        await conn.send_data(call, grpc_frame(chunk))
    if ending == "unavailable":  # what our server sends each stream when it shuts down
        await conn.end(call, 14, "server shutting down")
        return
    code = (
        h2.errors.ErrorCodes.NO_ERROR
        if ending == "graceful"
        else h2.errors.ErrorCodes.INTERNAL_ERROR
    )
    conn.h2.close_connection(error_code=code, last_stream_id=call.stream_id)  # still "taken"
    await conn.flush()
    await trio.aclose_forcefully(conn.stream)  # ...and the connection ends before its status


@pytest.mark.parametrize(
    ("ending", "error", "message"),
    [
        ("unavailable", ServerShuttingDown, "server shutting down"),
        ("graceful", ServerShuttingDown, "server shutting down"),
        ("error", ConnectionLost, "connection lost"),
    ],
)
async def test_a_server_going_away_mid_stream_says_whether_it_shut_down(
    test_pki: TestPKI, ending: str, error: type[Exception], message: str
) -> None:
    async def handler(conn: FakeConnection, call: ServerCall) -> None:
        await stream_then(conn, call, ending)

    received: list[bytes] = []

    async def drain(client: JobClient) -> None:
        async with client.stream("1") as output:
            async for chunk in output:
                received.append(chunk)

    async with (
        fake_server(test_pki, handler) as server,
        client_for(test_pki, server.address) as client,
    ):
        with trio.fail_after(WAIT_S), pytest.raises(error) as caught:
            await drain(client)
    assert received == [b"0", b"1"]
    assert str(caught.value) == message
    if error is ServerShuttingDown:
        assert isinstance(caught.value, RpcError)
        assert caught.value.code_name == "UNAVAILABLE"


async def wait_for_calls(server: FakeServer, count: int) -> None:
    with trio.fail_after(WAIT_S):
        while len(server.calls) < count:
            await trio.sleep(0.01)


async def test_malformed_response_is_an_internal_error_not_a_crash(test_pki: TestPKI) -> None:
    async def garbage(conn: FakeConnection, call: ServerCall) -> None:
        if call.headers[":path"].endswith("/GetJob"):
            await conn.respond(call, b"\xff\xff\xff\xff")
        else:
            await conn.respond(call, b"")  # an empty Jobs message

    async with (
        fake_server(test_pki, garbage) as server,
        client_for(test_pki, server.address) as client,
    ):
        with pytest.raises(RpcError) as caught:
            await client.get("1")
        assert (caught.value.code_name, str(caught.value)) == (
            "INTERNAL",
            "the server sent a malformed response",
        )
        assert (await client.list()) == []  # the connection survives it


async def test_a_call_after_a_graceful_idle_close_finds_the_connection_closed(
    test_pki: TestPKI,
) -> None:
    async with (
        fake_server(test_pki, answer_get) as server,
        client_for(test_pki, server.address) as client,
    ):
        await client.get("1")
        connection = server.connections[0]
        connection.h2.close_connection(last_stream_id=1)  # NO_ERROR, nothing in progress
        await connection.flush()
        await trio.aclose_forcefully(connection.stream)
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    await client.get("2")
                except ServerShuttingDown:  # raced the close: cut short by it, rightly
                    await trio.sleep(0.01)
                    continue
                except ConnectionLost as exc:
                    lost = exc
                    break
    assert str(lost) == "connection lost: the server closed the connection"
