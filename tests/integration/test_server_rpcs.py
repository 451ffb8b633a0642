"""Every RPC against the real server: through grpcio (the outside client, as the spec's Python
example uses it), through purerpc's generated stubs, and through the project's own client."""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import purerpc
import pytest

from jobworker.api import worker_grpc, worker_pb2, worker_pb2_grpc
from jobworker.client import open_client
from tests.support import JOB_PYTHON

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CHUNK_LIMIT = 64 * 1024
PY = JOB_PYTHON


def wait_status(stub: worker_pb2_grpc.JobServiceStub, job_id: str, *statuses: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        status = stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5).status
        if status in statuses:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.02)


@pytest.fixture
def admin(grpc_channel_for: Callable[[str], grpc.Channel]) -> worker_pb2_grpc.JobServiceStub:
    return worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))


def test_create_job_returns_the_whole_job_with_defaults_applied(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    res = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["5"]), timeout=10)
    assert res.id == "1"
    assert res.command == "sleep"
    assert list(res.args) == ["5"]
    assert (res.maxCPU, res.maxMemory, res.maxIOBPS) == (100, 512, 0)  # the spec's defaults
    assert res.status == "RUNNING"
    assert RFC3339_Z.match(res.startTime), res.startTime
    assert res.endTime == ""
    assert res.exitCode == 0
    stopped = admin.StopJob(worker_pb2.StopJobReq(id=res.id), timeout=10)
    assert stopped.id == "1"
    assert stopped.status == "STOPPED"
    assert RFC3339_Z.match(stopped.endTime), stopped.endTime
    assert stopped.exitCode != 0  # ended by a signal: 128 + signal number


def test_create_job_echoes_explicit_limits(admin: worker_pb2_grpc.JobServiceStub) -> None:
    res = admin.CreateJob(
        worker_pb2.CreateJobReq(command="true", maxCPU=50, maxMemory=256, maxIOBPS=1_000_000),
        timeout=10,
    )
    assert (res.maxCPU, res.maxMemory, res.maxIOBPS) == (50, 256, 1_000_000)
    got = admin.GetJob(worker_pb2.GetJobReq(id=res.id), timeout=5)
    assert (got.maxCPU, got.maxMemory, got.maxIOBPS) == (50, 256, 1_000_000)


def test_get_and_list_return_every_field_of_finished_jobs(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    ok = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    bad = admin.CreateJob(worker_pb2.CreateJobReq(command="sh", args=["-c", "exit 3"]), timeout=10)
    assert wait_status(admin, ok.id, "COMPLETED") == "COMPLETED"
    assert wait_status(admin, bad.id, "FAILED") == "FAILED"
    got = admin.GetJob(worker_pb2.GetJobReq(id=bad.id), timeout=5)
    assert (got.id, got.command, list(got.args)) == (bad.id, "sh", ["-c", "exit 3"])
    assert got.exitCode == 3
    assert RFC3339_Z.match(got.startTime)
    assert RFC3339_Z.match(got.endTime)
    jobs = admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs
    assert [(j.id, j.status, j.exitCode) for j in jobs] == [
        (ok.id, "COMPLETED", 0),
        (bad.id, "FAILED", 3),
    ]
    assert all(j.maxMemory == 512 and j.endTime for j in jobs)


def test_list_shows_a_running_job_then_its_end_and_repeats_finished_entries_exactly(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    # The servicer reuses a finished job's encoded entry: a running job's must not be frozen.
    done = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    running = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["30"]), timeout=10)
    assert wait_status(admin, done.id, "COMPLETED") == "COMPLETED"
    first = admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs
    assert [(j.id, j.status, j.endTime) for j in first] == [
        (done.id, "COMPLETED", first[0].endTime),
        (running.id, "RUNNING", ""),
    ]
    stopped = admin.StopJob(worker_pb2.StopJobReq(id=running.id), timeout=10)
    for _ in range(2):  # built, then served from the cache: the same answer
        jobs = admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs
        assert jobs[0] == first[0]
        assert (jobs[1].id, jobs[1].status, jobs[1].endTime, jobs[1].exitCode) == (
            running.id,
            "STOPPED",
            stopped.endTime,
            stopped.exitCode,
        )
        assert (jobs[1].command, list(jobs[1].args), jobs[1].maxMemory) == ("sleep", ["30"], 512)


def test_stream_of_a_finished_job_sends_everything_in_chunks_of_at_most_64_kib(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    size = 300_000  # written in one go: the server must split it
    script = f"import sys; sys.stdout.buffer.write(bytes(range(256)) * {size // 256})"
    job = admin.CreateJob(worker_pb2.CreateJobReq(command=PY, args=["-c", script]), timeout=10)
    wait_status(admin, job.id, "COMPLETED")
    chunks = [
        c.payload for c in admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10)
    ]
    data = b"".join(chunks)
    assert data == bytes(range(256)) * (size // 256)
    assert max(len(c) for c in chunks) <= CHUNK_LIMIT
    assert len(chunks) >= len(data) // CHUNK_LIMIT


def test_stream_sends_history_then_live_output_and_ends_when_the_job_ends(
    admin: worker_pb2_grpc.JobServiceStub,
    server: ServerProc,
) -> None:
    # The job prints "first", then waits until the test created the file (in its work dir, the
    # one host path a job sees), then "second".
    script = "echo first; while [ ! -e go ]; do sleep 0.02; done; echo second"
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="sh", args=["-c", script]), timeout=10)
    flag = server.data_dir / "jobs" / job.id / "work" / "go"
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=20)
    received = b""
    for chunk in stream:
        received += chunk.payload
        if received == b"first\n":
            flag.touch()  # history is in; everything after this is live output
    assert received == b"first\nsecond\n"
    assert stream.code() == grpc.StatusCode.OK
    assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=5).status == "COMPLETED"


def test_stream_of_a_job_without_output_ends_ok_with_no_chunk(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10)
    assert list(stream) == []
    assert stream.code() == grpc.StatusCode.OK


def client_ssl_context(test_pki: TestPKI, stem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=test_pki.ca_cert)
    context.load_cert_chain(test_pki.cert(stem), test_pki.key(stem))
    context.set_alpn_protocols(["h2"])
    return context


async def test_every_rpc_through_purerpc_stubs(server: ServerProc, test_pki: TestPKI) -> None:
    context = client_ssl_context(test_pki, "admin-client")
    async with purerpc.secure_channel(server.host, server.port, context) as channel:
        stub = worker_grpc.JobServiceStub(channel)
        created = await stub.CreateJob(
            worker_pb2.CreateJobReq(command="sh", args=["-c", "echo hello; exec sleep 30"])
        )
        assert (created.id, created.status, created.maxMemory) == ("1", "RUNNING", 512)
        async for chunk in stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=created.id)):
            assert chunk.payload == b"hello\n"  # output before the stop below
            break
        got = await stub.GetJob(worker_pb2.GetJobReq(id=created.id))
        assert got.command == "sh"
        jobs = await stub.GetJobs(worker_pb2.EmptyRequest())
        assert [j.id for j in jobs.jobs] == ["1"]
        stopped = await stub.StopJob(worker_pb2.StopJobReq(id=created.id))
        assert (stopped.id, stopped.status) == ("1", "STOPPED")
        output = b""
        async for chunk in stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=created.id)):
            output += chunk.payload
        assert output == b"hello\n"
        with pytest.raises(purerpc.NotFoundError) as caught:
            await stub.GetJob(worker_pb2.GetJobReq(id="42"))
        assert caught.value.status.status_message == "job not found: 42"


async def test_every_rpc_through_the_project_client(server: ServerProc, test_pki: TestPKI) -> None:
    async with open_client(
        server.address,
        cert=test_pki.cert("admin-client"),
        key=test_pki.key("admin-client"),
        ca=test_pki.ca_cert,
    ) as client:
        created = await client.create("sh", ["-c", "echo hi; exec sleep 30"])
        assert created.status == "RUNNING"
        async with client.stream(created.id) as first:
            assert await first.__anext__() == b"hi\n"  # output before the stop below
        assert (await client.get(created.id)).id == created.id
        assert [j.id for j in await client.list()] == [created.id]
        assert (await client.stop(created.id)).status == "STOPPED"
        output = b""
        async with client.stream(created.id) as chunks:
            async for chunk in chunks:
                output += chunk
        assert output == b"hi\n"
