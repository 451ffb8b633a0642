"""Deadlines and cancellations end the server-side handler at once, and leave nothing behind."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import purerpc
import pytest
from purerpc.wrappers import extract_message_from_singleton_stream

from jobworker.api import worker_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.test_server_limits import RawH2, grpc_message
from tests.support import JOB_PYTHON

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

Credentials = Callable[[str], grpc.ChannelCredentials]

SERVICE = "job_worker.JobService"
STOP_GRACE_S = 2.0  # long enough that a StopJob of a TERM-ignoring job outlives the deadline
DEADLINE_S = 0.3
# Prints "ready" once its TERM handler is ignored, then sleeps; exec keeps the disposition.
IGNORES_TERM = ["-c", "trap '' TERM; echo ready; exec sleep 60"]
# Writes 64 KiB blocks forever (bounded by the test's lifetime): a chatty job.
CHATTY = [
    "-c",
    "import sys, time\n"
    "block = b'x' * 65535 + b'\\n'\n"
    "while True:\n"
    "    sys.stdout.buffer.write(block); sys.stdout.flush(); time.sleep(0.005)\n",
]
AUDIT_RE = r"method={method} op=\w+ job={job} outcome=(\w+) duration_ms=([\d.]+)"


@pytest.fixture
def slow_stop_server(server_factory: ServerFactory) -> Iterator[ServerProc]:
    with server_factory("--stop-grace", str(STOP_GRACE_S)) as srv:
        yield srv


def audit_outcomes(srv: ServerProc, method: str, job: str) -> list[tuple[str, float]]:
    """The outcomes of ``method`` on ``job`` in the audit log, once there is at least one
    (log lines are written by a thread, a moment after the call ended)."""
    pattern = AUDIT_RE.format(method=method, job=re.escape(job))
    text = srv.wait_for_log(pattern)
    return [(code, float(ms)) for code, ms in re.findall(pattern, text)]


def wait_ready(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    for chunk in stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=10):
        if b"ready" in chunk.payload:
            return
    raise AssertionError(f"job {job_id} ended without printing 'ready'")


def test_a_client_deadline_shorter_than_the_stop_cancels_the_handler(
    grpc_credentials_for: Credentials, slow_stop_server: ServerProc
) -> None:
    srv = slow_stop_server
    with grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel:
        admin = worker_pb2_grpc.JobServiceStub(channel)
        job = admin.CreateJob(worker_pb2.CreateJobReq(command="sh", args=IGNORES_TERM), timeout=10)
        wait_ready(admin, job.id)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0
        srv.wait_for_log(AUDIT_RE.format(method="StopJob", job=job.id))
        [(outcome, duration_ms)] = audit_outcomes(srv, "StopJob", job.id)
        # grpcio resets the stream at its deadline; the server's own timer fires at the same
        # moment: either way the handler ended long before the 2 s stop did.
        assert outcome in ("DEADLINE_EXCEEDED", "CANCELLED")
        assert duration_ms < 1000
        # The stop itself was not undone: the job still ends STOPPED after the grace period.
        list(admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10))
        assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=5).status == "STOPPED"


def client_context(test_pki: TestPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=test_pki.ca_cert)
    context.load_cert_chain(test_pki.cert("admin-client"), test_pki.key("admin-client"))
    context.set_alpn_protocols(["h2"])
    return context


async def test_the_server_enforces_grpc_timeout_itself(
    test_pki: TestPKI, slow_stop_server: ServerProc
) -> None:
    # purerpc's client sends grpc-timeout but never resets the stream: only the server's
    # own deadline can end this call.
    srv = slow_stop_server
    async with purerpc.secure_channel(srv.host, srv.port, client_context(test_pki)) as channel:
        jobs = worker_grpc.JobServiceStub(channel)
        job = await jobs.CreateJob(worker_pb2.CreateJobReq(command="sh", args=IGNORES_TERM))
        async for chunk in jobs.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id)):
            if b"ready" in chunk.payload:
                break
        stream = await channel._grpc_socket.start_request(
            "https",
            SERVICE,
            "StopJob",
            worker_pb2.StopJobReq.DESCRIPTOR.full_name,
            srv.address,
            timeout=dt.timedelta(seconds=DEADLINE_S),
        )
        stream.expect_message_type(worker_pb2.StopJobRes)
        await stream.send_message(worker_pb2.StopJobReq(id=job.id))
        await stream.close()
        started = time.monotonic()
        with pytest.raises(purerpc.DeadlineExceededError):
            await extract_message_from_singleton_stream(stream)
        assert time.monotonic() - started < 1.0
    [(outcome, duration_ms)] = audit_outcomes(srv, "StopJob", job.id)
    assert outcome == "DEADLINE_EXCEEDED"
    assert duration_ms < 1000


def cancel_mid_stream(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    call = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=30)
    assert next(call).payload  # the stream is live: output is flowing
    call.cancel()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_cancelled_stream_ends_its_handler_promptly(
    grpc_credentials_for: Credentials, server: ServerProc
) -> None:
    with grpc.secure_channel(server.address, grpc_credentials_for("admin-client")) as ch:
        admin = worker_pb2_grpc.JobServiceStub(ch)
        job = admin.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=CHATTY))
        # A reader that stopped reading: the handler is blocked on HTTP/2 flow control.
        call = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=30)
        assert next(call).payload
        time.sleep(0.5)  # let the job fill every window (not a synchronisation)
        cancelled = time.monotonic()
        call.cancel()
        server.wait_for_log(AUDIT_RE.format(method="GetJobsStream", job=job.id), timeout=2)
        assert time.monotonic() - cancelled < 1.0
        [(outcome, _)] = audit_outcomes(server, "GetJobsStream", job.id)
        assert outcome == "CANCELLED"
        admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)


def test_100_cancelled_streams_leave_tasks_and_files_where_they_were(
    grpc_credentials_for: Credentials, server: ServerProc
) -> None:
    credentials = grpc_credentials_for("admin-client")
    with grpc.secure_channel(server.address, credentials) as channel:
        admin = worker_pb2_grpc.JobServiceStub(channel)
        job = admin.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=CHATTY))
        cancel_mid_stream(admin, job.id)  # warm-up: anything created lazily exists now
        audit_line = AUDIT_RE.format(method="GetJobsStream", job=job.id)
        server.wait_for_log(audit_line, timeout=5)
        baseline_tasks, baseline_connections = server.debug_counts()
        baseline_fds = server.fd_count()
        assert baseline_connections == 1

        for _ in range(100):
            cancel_mid_stream(admin, job.id)
        # and 10 more whose whole connection goes away mid-stream
        for _ in range(10):
            with grpc.secure_channel(server.address, credentials) as other:
                cancel_mid_stream(worker_pb2_grpc.JobServiceStub(other), job.id)

        server.wait_for_log(audit_line, timeout=10, count=111)
        outcomes = {code for code, _ in audit_outcomes(server, "GetJobsStream", job.id)}
        assert outcomes == {"CANCELLED"}
        wait_until(lambda: server.debug_counts() == (baseline_tasks, 1), 10, "tasks to settle")
        wait_until(lambda: server.fd_count() == baseline_fds, 10, "fds to settle")
        admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)


def create_with_timeout(client: RawH2, timeout: str) -> int:
    """Send CreateJob(/bin/true) with ``grpc-timeout: <timeout>`` in one write."""
    stream_id: int = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", f"/{SERVICE}/CreateJob"),
            (":authority", client.authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("grpc-timeout", timeout),
        ],
    )
    request = worker_pb2.CreateJobReq(command="/bin/true")
    client.conn.send_data(stream_id, grpc_message(request), end_stream=True)
    client.flush()
    return stream_id


def test_a_create_whose_deadline_passed_is_not_started_and_uses_no_id(
    server: ServerProc, test_pki: TestPKI, grpc_credentials_for: Credentials
) -> None:
    # grpc-timeout 1n: the deadline has passed before the handler gets anywhere, yet the
    # request is complete (a retrying client's view: it gave up, so must the server). grpcio
    # sends at least 1 ms, which a fast server may or may not beat: not a reproducible test.
    client = RawH2(server, test_pki)
    try:
        ids = [create_with_timeout(client, "1n") for _ in range(20)]
        client.wait_for(lambda: all("grpc-status" in client.trailers(i) for i in ids))
        statuses = {client.trailers(i)["grpc-status"] for i in ids}
    finally:
        client.close()
    assert statuses == {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])}
    with grpc.secure_channel(server.address, grpc_credentials_for("admin-client")) as channel:
        stub = worker_pb2_grpc.JobServiceStub(channel)
        assert list(stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs) == []
        job = stub.CreateJob(worker_pb2.CreateJobReq(command="/bin/true"), timeout=10)
        assert job.id == "1"  # no id was used
    log = server.wait_for_log("job 1 created")  # lines are written by a thread, a bit later
    assert "job 2 created" not in log
