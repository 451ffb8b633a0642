"""DeleteJob end to end, through grpcio and the CLI: an ended job's record, output and files
go, a running job is refused, streams of the job end first (NOT_FOUND, or OK if they had
delivered everything), admin only, and ids are never reused, also after a restart."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from jobworker.engine.manager import DELETE_STREAM_PATIENCE_S, STREAM_CANCEL_WAIT_S
from tests.integration.test_server_limits import RawH2
from tests.integration.test_server_metrics import metrics_address, scrape, value
from tests.support import cli_flags, grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

Stub = worker_pb2_grpc.JobServiceStub
TIMEOUT = 10
# Far more than grpcio buffers for a stream its application does not read: the server's
# handler is then held by flow control, mid-output, when the delete comes.
BIG_OUTPUT = 64 * 1024 * 1024
BIG = ["-c", f"head -c {BIG_OUTPUT} /dev/zero"]
# The longest a delete may wait for a stream stuck on a client that does not read.
STUCK_BOUND_S = DELETE_STREAM_PATIENCE_S + STREAM_CANCEL_WAIT_S


@pytest.fixture
def stubs(test_pki: TestPKI, server: ServerProc) -> Iterator[dict[str, Stub]]:
    channels = {
        role: grpc.secure_channel(server.address, grpc_credentials(test_pki, f"{role}-client"))
        for role in ("admin", "viewer")
    }
    yield {role: Stub(channel) for role, channel in channels.items()}
    for channel in channels.values():
        channel.close()


def ended(stub: Stub, command: str, *args: str) -> str:
    """Create a job and wait for its end (its stream ends with it); return its id."""
    job = stub.CreateJob(worker_pb2.CreateJobReq(command=command, args=args), timeout=TIMEOUT)
    for _ in stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=60):
        pass
    deadline = time.monotonic() + TIMEOUT
    while stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT).status == "RUNNING":
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.01)
    return str(job.id)


def delete(stub: Stub, job_id: str) -> worker_pb2.DeleteJobRes:
    return stub.DeleteJob(worker_pb2.DeleteJobReq(id=job_id), timeout=TIMEOUT)


def error_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def not_found(job_id: str) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.NOT_FOUND, f"job not found: {job_id}"


def known(stub: Stub, job_id: str) -> bool:
    """GetJob finds the job (False once it answers NOT_FOUND)."""
    try:
        stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def drain(stream: Iterator[worker_pb2.DataChunk], into: bytearray) -> None:
    for chunk in stream:
        into += chunk.payload


def open_files_of(server: ServerProc, job_id: str) -> list[str]:
    """What the server holds open inside the job's directory (an output log, deleted or not)."""
    found = []
    for fd in os.listdir(f"/proc/{server.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{server.pid}/fd/{fd}")
        except OSError:
            continue
        if f"/jobs/{job_id}/" in target or f"/jobs/.deleted.{job_id}." in target:
            found.append(target)
    return found


def test_a_finished_job_is_gone_with_its_files_from_every_rpc(
    stubs: dict[str, Stub], server: ServerProc
) -> None:
    admin = stubs["admin"]
    job_id = ended(admin, "sh", "-c", "echo hello; echo scratch > left-behind")
    job_dir = server.data_dir / "jobs" / job_id
    assert (job_dir / "work" / "left-behind").exists()
    assert delete(admin, job_id).id == job_id
    assert not job_dir.exists()
    assert not [p for p in (server.data_dir / "jobs").iterdir() if job_id in p.name]
    assert error_of(lambda: admin.GetJob(worker_pb2.GetJobReq(id=job_id))) == not_found(job_id)
    assert error_of(lambda: admin.StopJob(worker_pb2.StopJobReq(id=job_id))) == not_found(job_id)
    request = worker_pb2.GetJobsStreamReq(id=job_id)
    assert error_of(lambda: list(admin.GetJobsStream(request))) == not_found(job_id)
    assert error_of(lambda: delete(admin, job_id)) == not_found(job_id)
    listed = admin.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs
    assert job_id not in [job.id for job in listed]
    paged = admin.ListJobs(worker_pb2.ListJobsReq(), timeout=TIMEOUT).jobs
    assert job_id not in [job.id for job in paged]
    server.wait_for_log(rf"method=DeleteJob op=delete_job job={job_id} outcome=OK ")


def test_a_listing_keeps_the_other_jobs(stubs: dict[str, Stub]) -> None:
    admin = stubs["admin"]
    first, second, third = (ended(admin, "true") for _ in range(3))
    delete(admin, second)
    assert [job.id for job in admin.GetJobs(worker_pb2.EmptyRequest()).jobs] == [first, third]
    page = admin.ListJobs(worker_pb2.ListJobsReq(pageSize=1), timeout=TIMEOUT)
    assert [job.id for job in page.jobs] == [first]
    rest = admin.ListJobs(worker_pb2.ListJobsReq(pageToken=page.nextPageToken), timeout=TIMEOUT)
    assert [job.id for job in rest.jobs] == [third]


def test_a_running_job_is_refused_and_nothing_is_removed(
    stubs: dict[str, Stub], server: ServerProc
) -> None:
    admin = stubs["admin"]
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["60"]), timeout=TIMEOUT)
    assert error_of(lambda: delete(admin, job.id)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"job is running: {job.id}",
    )
    assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT).status == "RUNNING"
    assert (server.data_dir / "jobs" / job.id / "job.json").exists()
    server.wait_for_log(rf"method=DeleteJob op=delete_job job={job.id} outcome=FAILED_PRECONDITION")
    admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=TIMEOUT)
    assert delete(admin, job.id).id == job.id


def test_an_unknown_id_is_not_found(stubs: dict[str, Stub]) -> None:
    assert error_of(lambda: delete(stubs["admin"], "999")) == not_found("999")


def test_a_viewer_may_not_delete(stubs: dict[str, Stub], server: ServerProc) -> None:
    job_id = ended(stubs["admin"], "true")
    assert error_of(lambda: delete(stubs["viewer"], job_id)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "role viewer is not allowed to perform operation delete_job",
    )
    viewed = stubs["viewer"].GetJob(worker_pb2.GetJobReq(id=job_id), timeout=TIMEOUT)
    assert viewed.status == "COMPLETED"
    assert (server.data_dir / "jobs" / job_id).is_dir()


def test_a_stream_being_read_ends_not_found_at_a_message_boundary_and_leaks_nothing(
    stubs: dict[str, Stub], server: ServerProc
) -> None:
    admin = stubs["admin"]
    job_id = ended(admin, "sh", *BIG)
    baseline = server.debug_counts()
    baseline_fds = server.fd_count()
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=60)
    received = bytearray(next(stream).payload)
    deleting = admin.DeleteJob.future(worker_pb2.DeleteJobReq(id=job_id), timeout=TIMEOUT)
    # The job is unknown from the delete's first moment; the stream is still open.
    wait_until(lambda: not known(admin, job_id), "the delete to begin")
    with pytest.raises(grpc.RpcError) as caught:
        drain(stream, received)  # what grpcio had buffered, then the end the server chose
    assert (caught.value.code(), caught.value.details()) == not_found(job_id)
    assert 0 < len(received) < BIG_OUTPUT
    assert received == b"\0" * len(received)  # whole messages: nothing cut, nothing mixed
    assert deleting.result(timeout=STUCK_BOUND_S + TIMEOUT).id == job_id
    assert not (server.data_dir / "jobs" / job_id).exists()
    server.wait_for_log(rf"method=GetJobsStream op=stream_job job={job_id} outcome=NOT_FOUND ")
    wait_until(lambda: server.debug_counts() == baseline, "tasks to settle")
    wait_until(lambda: server.fd_count() == baseline_fds, "fds to settle")
    assert open_files_of(server, job_id) == []


def test_a_stream_whose_client_does_not_read_is_cut_off_after_the_patience(
    stubs: dict[str, Stub], server: ServerProc, test_pki: TestPKI
) -> None:
    admin = stubs["admin"]
    job_id = ended(admin, "sh", *BIG)
    raw = RawH2(server, test_pki)
    raw.pump(0.2)  # the server's SETTINGS, acknowledged
    baseline = server.debug_counts()
    baseline_fds = server.fd_count()
    # The first 64 KiB message does not fit the initial window (65535 bytes), and this client
    # never opens it further: the server's handler waits on flow control for good.
    stream_id = raw.request("GetJobsStream", worker_pb2.GetJobsStreamReq(id=job_id))
    wait_until(lambda: len(open_files_of(server, job_id)) == 1, "the reader to open the log")
    started = time.monotonic()
    assert delete(admin, job_id).id == job_id
    took = time.monotonic() - started
    assert DELETE_STREAM_PATIENCE_S <= took < STUCK_BOUND_S + 1.0
    assert not (server.data_dir / "jobs" / job_id).exists()
    assert open_files_of(server, job_id) == []  # the reader let go of the deleted log
    raw.wait_for(lambda: "grpc-status" in raw.trailers(stream_id))
    trailers = raw.trailers(stream_id)
    assert (trailers["grpc-status"], trailers["grpc-message"]) == ("5", f"job not found: {job_id}")
    server.wait_for_log(rf"method=GetJobsStream op=stream_job job={job_id} outcome=NOT_FOUND ")
    wait_until(lambda: server.debug_counts() == baseline, "tasks to settle")
    wait_until(lambda: server.fd_count() == baseline_fds, "fds to settle")
    raw.close()


def test_a_stream_that_had_delivered_everything_is_ok(stubs: dict[str, Stub]) -> None:
    admin = stubs["admin"]
    job_id = ended(admin, "echo", "short")
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=TIMEOUT)
    assert next(stream).payload == b"short\n"  # all of it: the server's stream has ended
    delete(admin, job_id)
    assert list(stream) == []  # OK, not NOT_FOUND
    assert stream.code() is grpc.StatusCode.OK


def test_deleting_the_highest_id_then_restarting_never_reuses_it(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    credentials = grpc_credentials(test_pki, "admin-client")
    with server_factory() as first, grpc.secure_channel(first.address, credentials) as channel:
        admin = Stub(channel)
        ids = [ended(admin, "true") for _ in range(3)]
        assert ids == ["1", "2", "3"]
        delete(admin, "3")
        delete(admin, "2")
    with (
        server_factory("--data-dir", str(first.data_dir)) as again,
        grpc.secure_channel(again.address, credentials) as channel,
    ):
        admin = Stub(channel)
        assert [job.id for job in admin.GetJobs(worker_pb2.EmptyRequest()).jobs] == ["1"]
        assert error_of(lambda: admin.GetJob(worker_pb2.GetJobReq(id="3"))) == not_found("3")
        new = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=TIMEOUT)
        assert new.id == "4"
        assert re.search(r"next id 4\b", again.log_text())


def cli(test_pki: TestPKI, server: ServerProc, stem: str, *argv: str) -> list[str]:
    return [*cli_flags(test_pki, server.address, stem), *argv]


def test_the_cli_deletes_and_reports_errors_as_other_commands(
    stubs: dict[str, Stub],
    server: ServerProc,
    test_pki: TestPKI,
    capfd: pytest.CaptureFixture[str],
) -> None:
    admin = stubs["admin"]
    first, second = ended(admin, "true"), ended(admin, "true")
    capfd.readouterr()
    assert main(cli(test_pki, server, "admin-client", "delete", first)) == 0
    assert capfd.readouterr() == (f"Job deleted:\nID: {first}\n", "")
    assert main(cli(test_pki, server, "admin-client", "delete", second, "-o", "json")) == 0
    out, err = capfd.readouterr()
    assert (json.loads(out), err) == ({"id": second}, "")
    assert main(cli(test_pki, server, "admin-client", "delete", first)) == 1
    assert capfd.readouterr() == ("", f"Error: job not found: {first}\n")
    running = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["60"]))
    assert main(cli(test_pki, server, "admin-client", "delete", running.id)) == 1
    assert capfd.readouterr() == ("", f"Error: job is running: {running.id}\n")
    assert main(cli(test_pki, server, "viewer-client", "delete", running.id)) == 1
    assert capfd.readouterr().err == (
        "Error: role viewer is not allowed to perform operation delete_job\n"
    )
    admin.StopJob(worker_pb2.StopJobReq(id=running.id), timeout=TIMEOUT)


def test_what_a_deleted_job_counted_for_stays_counted(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    credentials = grpc_credentials(test_pki, "admin-client")
    with (
        server_factory("--metrics-listen", "127.0.0.1:0") as srv,
        grpc.secure_channel(srv.address, credentials) as channel,
    ):
        admin = Stub(channel)
        job_id = ended(admin, "echo", "counted")
        address = metrics_address(srv)
        before = scrape(address)
        delete(admin, job_id)
        after = scrape(address)
        for name, labels in (
            ("jobworker_jobs_created_total", {}),
            ("jobworker_jobs_ended_total", {"status": "COMPLETED", "reason_kind": "exited"}),
            ("jobworker_output_bytes_total", {}),
        ):
            assert value(after, name, **labels) == value(before, name, **labels), name
        assert value(after, "jobworker_output_bytes_total") == len(b"counted\n")
        assert value(after, "jobworker_jobs", status="COMPLETED") == 0  # a gauge: it goes
