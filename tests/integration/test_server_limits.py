"""The server's limits, each configurable and enforced: message size, concurrent streams per
connection, connections, idle connections, TLS handshake time. Raw HTTP/2 (h2 over an ssl
socket) where a well-behaved client could not break the rule."""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import JOB_PYTHON

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

Credentials = Callable[[str], grpc.ChannelCredentials]
SERVICE_PATH = "/job_worker.JobService/"
# A job that prints a line every 20 ms for a long time: streams on it stay open.
TICKER = [
    "-c",
    "import time\nfor i in range(100000):\n    print(i, flush=True); time.sleep(0.02)\n",
]


def grpc_message(message: Any) -> bytes:
    data = message.SerializeToString()
    return struct.pack(">?I", False, len(data)) + data


class RawH2:
    """A minimal blocking HTTP/2 client over TLS, free to break the rules."""

    def __init__(self, srv: ServerProc, test_pki: TestPKI, stem: str = "admin-client") -> None:
        context = ssl.create_default_context(cafile=test_pki.ca_cert)
        context.load_cert_chain(test_pki.cert(stem), test_pki.key(stem))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((srv.host, srv.port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname=srv.host)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.authority = srv.address
        self.events: list[Any] = []
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def headers(self, method: str, *, end_stream: bool = False) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", SERVICE_PATH + method),
                (":authority", self.authority),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ],
            end_stream=end_stream,
        )
        self.flush()
        return stream_id

    def request(self, method: str, message: Any) -> int:
        stream_id = self.headers(method)
        self.conn.send_data(stream_id, grpc_message(message), end_stream=True)
        self.flush()
        return stream_id

    def pump(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout`` (returns early on data)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.events.append(event)
        self.flush()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert not self.closed, f"connection closed; events: {self.events}"
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events: {self.events}"
            self.pump(min(left, 0.5))

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def trailers(self, stream_id: int) -> dict[str, str]:
        found: dict[str, str] = {}
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                found.update({k.decode(): v.decode() for k, v in event.headers})
        return found

    def ignore_stream_limit(self) -> None:
        """Open streams beyond the server's MAX_CONCURRENT_STREAMS (h2 would refuse to)."""
        code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        self.conn.remote_settings._settings[code] = collections.deque([2**31 - 1])

    def close(self) -> None:
        self.sock.close()


def test_an_oversized_request_fails_alone_and_the_connection_lives_on(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    big = worker_pb2.CreateJobReq(command="true", args=["x" * (1 << 20)] * 5)  # ~5 MiB
    with pytest.raises(grpc.RpcError) as caught:
        admin.CreateJob(big, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == (
        f"request message too large: {big.ByteSize()} bytes (limit 4194304)"
    )
    assert admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs == []  # same channel


def test_a_declared_2_gb_message_is_refused_without_buffering(
    server: ServerProc, test_pki: TestPKI
) -> None:
    client = RawH2(server, test_pki)
    try:
        stream_id = client.headers("CreateJob")
        # The length prefix says 2 GB; only a few bytes follow.
        client.conn.send_data(stream_id, struct.pack(">?I", False, 2**31 - 1) + b"abc")
        client.flush()
        client.wait_for(lambda: "grpc-status" in client.trailers(stream_id))
        trailers = client.trailers(stream_id)
        assert trailers["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
        assert "too large" in trailers["grpc-message"].replace("%20", " ")
        # the connection still serves: a normal call on a new stream
        second = client.request("GetJobs", worker_pb2.EmptyRequest())
        client.wait_for(lambda: "grpc-status" in client.trailers(second))
        assert client.trailers(second)["grpc-status"] == "0"
    finally:
        client.close()


def test_max_concurrent_streams_is_advertised_and_excess_streams_are_refused(
    server_factory: ServerFactory, test_pki: TestPKI, grpc_credentials_for: Credentials
) -> None:
    with server_factory("--max-concurrent-streams", "2") as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials_for("admin-client"))
        admin = worker_pb2_grpc.JobServiceStub(channel)
        job = admin.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=TICKER))
        client = RawH2(srv, test_pki)
        try:
            client.wait_for(lambda: bool(client.of(h2.events.RemoteSettingsChanged)))
            settings = client.of(h2.events.RemoteSettingsChanged)[0].changed_settings
            assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 2
            window = settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value
            assert window == 4 * 1024 * 1024 + 5  # one maximal request, not purerpc's 64 MiB
            request = worker_pb2.GetJobsStreamReq(id=job.id)
            client.ignore_stream_limit()
            first, second, third = (client.request("GetJobsStream", request) for _ in range(3))
            client.wait_for(lambda: bool(client.of(h2.events.StreamReset, third)))
            assert client.of(h2.events.StreamReset, third)[0].error_code == (
                h2.errors.ErrorCodes.REFUSED_STREAM
            )
            client.wait_for(
                lambda: (
                    bool(client.of(h2.events.DataReceived, first))
                    and bool(client.of(h2.events.DataReceived, second))
                )
            )
            assert not client.closed
            srv.wait_for_log("refused stream 5: 2 streams already open")
        finally:
            client.close()
        # grpcio respects the setting: 5 concurrent streams on one channel all complete.
        calls = [
            admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=20)
            for _ in range(5)
        ]
        for call in calls:
            assert next(call).payload
            call.cancel()
        admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
        channel.close()


def tls_connect(srv: ServerProc, test_pki: TestPKI) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=test_pki.ca_cert)
    context.load_cert_chain(test_pki.cert("admin-client"), test_pki.key("admin-client"))
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((srv.host, srv.port), timeout=5)
    return context.wrap_socket(raw, server_hostname=srv.host)


def test_connections_beyond_the_limit_are_closed_at_once(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--max-connections", "2") as srv:
        kept = [tls_connect(srv, test_pki) for _ in range(2)]
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls_connect(srv, test_pki).recv(1)
            srv.wait_for_log(r"connection limit \(2\) reached: refused 1 connection")
        finally:
            kept.pop().close()
        # once one is gone, a new one is accepted (the server counts it down asynchronously)
        deadline = time.monotonic() + 5
        while True:
            try:
                kept.append(tls_connect(srv, test_pki))
                break
            except (ssl.SSLError, ConnectionError):
                assert time.monotonic() < deadline, "no connection accepted after one closed"
                time.sleep(0.05)
        for sock in kept:
            sock.close()


def test_idle_connections_get_goaway_and_are_closed(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--idle-timeout", "0.5") as srv:
        client = RawH2(srv, test_pki)
        try:
            done = client.request("GetJobs", worker_pb2.EmptyRequest())
            client.wait_for(lambda: "grpc-status" in client.trailers(done))
            started = time.monotonic()
            client.wait_for(lambda: bool(client.of(h2.events.ConnectionTerminated)), timeout=5)
            assert 0.4 < time.monotonic() - started < 3
            assert client.of(h2.events.ConnectionTerminated)[0].error_code == 0
            deadline = time.monotonic() + 5
            while not client.closed:
                assert time.monotonic() < deadline, "the idle connection was not closed"
                client.pump(0.2)
        finally:
            client.close()


def test_a_stream_longer_than_the_idle_timeout_is_not_cut(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    with (
        server_factory("--idle-timeout", "0.5") as srv,
        grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel,
    ):
        admin = worker_pb2_grpc.JobServiceStub(channel)
        job = admin.CreateJob(
            worker_pb2.CreateJobReq(command="sh", args=["-c", "echo a; sleep 1.5; echo b"])
        )
        chunks = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10)
        assert b"".join(c.payload for c in chunks) == b"a\nb\n"


def test_a_stalled_tls_handshake_is_dropped_after_the_timeout(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    with server_factory("--handshake-timeout", "0.5") as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server, not by our timeout
            assert 0.4 < time.monotonic() - started < 3
        text = srv.wait_for_log("TLS handshake with .* failed: handshake timed out")
        assert "Traceback" not in text
        with grpc.secure_channel(srv.address, grpc_credentials_for("viewer-client")) as channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            assert stub.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs == []


def test_a_compressed_request_is_refused_alone(server: ServerProc, test_pki: TestPKI) -> None:
    # No decompression at all (purerpc's would inflate without a limit: a compression bomb).
    client = RawH2(server, test_pki)
    try:
        stream_id = client.headers("GetJobs")
        payload = zlib.compress(b"")
        client.conn.send_data(
            stream_id, struct.pack(">?I", True, len(payload)) + payload, end_stream=True
        )
        client.flush()
        client.wait_for(lambda: "grpc-status" in client.trailers(stream_id))
        assert client.trailers(stream_id)["grpc-status"] == "12"  # UNIMPLEMENTED
        second = client.request("GetJobs", worker_pb2.EmptyRequest())
        client.wait_for(lambda: "grpc-status" in client.trailers(second))
        assert client.trailers(second)["grpc-status"] == "0"
    finally:
        client.close()


def test_broken_http2_closes_that_connection_with_one_log_line(
    server: ServerProc, test_pki: TestPKI, grpc_channel_for: Callable[[str], grpc.Channel]
) -> None:
    client = RawH2(server, test_pki)
    try:
        # A DATA frame on stream 0 is a connection error (RFC 7540 6.1).
        client.sock.sendall(struct.pack(">I", 4)[1:] + b"\x00\x00" + struct.pack(">I", 0) + b"oops")
        deadline = time.monotonic() + 5
        while not client.closed:
            assert time.monotonic() < deadline, "the broken connection was not closed"
            with contextlib.suppress(h2.exceptions.ProtocolError):
                client.pump(0.2)
    finally:
        client.close()
    text = server.wait_for_log(r"INFO jobworker\.server\.handler connection from .* ended: HTTP/2")
    assert "Traceback" not in text
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    assert admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs == []
