"""Each error a client can meet, with the spec's code and message; nothing internal leaks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from purerpc.grpclib.status import StatusCode

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.errors import CommandNotFound, JobNotFound, JobStartFailed, LimitRefused
from jobworker.server.errors import INTERNAL_MESSAGE, status_for

if TYPE_CHECKING:
    from tests.integration.conftest import ServerProc


@pytest.fixture
def admin(grpc_channel_for: Callable[[str], grpc.Channel]) -> worker_pb2_grpc.JobServiceStub:
    return worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))


def failure(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        fn()
    return caught.value.code(), caught.value.details()


def test_unknown_id_is_not_found_for_every_rpc_taking_one(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    expected = (grpc.StatusCode.NOT_FOUND, "job not found: 999")
    assert failure(lambda: admin.GetJob(worker_pb2.GetJobReq(id="999"), timeout=5)) == expected
    assert failure(lambda: admin.StopJob(worker_pb2.StopJobReq(id="999"), timeout=5)) == expected
    assert (
        failure(lambda: list(admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id="999"), timeout=5)))
        == expected
    )


def test_stopping_a_finished_job_is_a_failed_precondition(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    # the stream ends once the job has ended: a wait without polling
    list(admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10))
    assert failure(lambda: admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=5)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"job is not running: {job.id} (current status: COMPLETED)",
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            worker_pb2.CreateJobReq(command="invalid-command"),
            "command not found in PATH: invalid-command",
        ),
        (worker_pb2.CreateJobReq(command=""), "command must not be empty"),
        (
            worker_pb2.CreateJobReq(command="true", maxMemory=-1),
            "maxMemory must not be negative, got -1",
        ),
    ],
)
def test_invalid_job_specs_are_invalid_arguments(
    admin: worker_pb2_grpc.JobServiceStub, request_: worker_pb2.CreateJobReq, message: str
) -> None:
    assert failure(lambda: admin.CreateJob(request_, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
    )
    assert admin.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs == []  # no id used


def test_a_malformed_request_message_is_an_invalid_argument(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    channel = grpc_channel_for("admin-client")
    raw = channel.unary_unary("/job_worker.JobService/GetJob")  # bytes in, bytes out
    # field 1 declared as a 100-byte string, 2 bytes present
    assert failure(lambda: raw(b"\x0a\x64ab", timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed request message",
    )


def test_an_unknown_method_is_unimplemented_and_the_connection_lives_on(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    channel = grpc_channel_for("admin-client")
    raw = channel.unary_unary("/job_worker.JobService/Explode")
    assert failure(lambda: raw(b"", timeout=5)) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "unknown method job_worker.JobService/Explode",
    )
    other = channel.unary_unary("/other.Service/GetJob")
    assert failure(lambda: other(b"", timeout=5))[0] == grpc.StatusCode.UNIMPLEMENTED
    stub = worker_pb2_grpc.JobServiceStub(channel)
    assert stub.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs == []


def test_the_audit_line_records_each_outcome(
    admin: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    failure(lambda: admin.GetJob(worker_pb2.GetJobReq(id="7"), timeout=5))
    text = server.wait_for_log(
        r"INFO jobworker\.audit rpc identity=admin role=admin method=GetJob op=get_job "
        r"job=7 outcome=NOT_FOUND duration_ms=\d+\.\d"
    )
    assert "Traceback" not in text


def test_a_client_cannot_forge_audit_lines(
    admin: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    """Ids come from clients: one written raw could end the line and start a fake one."""
    forged = "1 outcome=OK\n2026-01-01T00:00:00.000Z INFO jobworker.audit rpc identity=root"
    failure(lambda: admin.GetJob(worker_pb2.GetJobReq(id=forged + "x" * 100), timeout=5))
    text = server.wait_for_log(r"method=GetJob op=get_job job=.* outcome=NOT_FOUND")
    lines = text.splitlines()
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in lines)
    [audit] = [line for line in lines if "method=GetJob" in line]
    assert 'job="1 outcome=OK\\n2026-01-01T00:00:00.000Z INFO jobworker.audit' in audit
    assert '"... outcome=NOT_FOUND duration_ms=' in audit  # clipped to 64 characters


# The status table itself, without a server: the paths a running server cannot be made to take.


def test_unexpected_errors_become_internal_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="jobworker.server.errors"):
        status = status_for(RuntimeError("secret at /etc/jobworker/key.pem"))
    assert (status.status_code, status.status_message) == (StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "secret" not in status.status_message
    assert any(r.exc_info and "secret" in str(r.exc_info[1]) for r in caplog.records)


def test_errors_wrapped_in_exception_groups_keep_their_code() -> None:
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [JobNotFound("7")])])
    status = status_for(nested)
    assert (status.status_code, status.status_message) == (StatusCode.NOT_FOUND, "job not found: 7")


def test_subclasses_inherit_their_parents_code() -> None:
    assert status_for(CommandNotFound("x")).status_code == StatusCode.INVALID_ARGUMENT
    assert status_for(LimitRefused("memory limit refused")).status_code == (
        StatusCode.INVALID_ARGUMENT
    )
    started = status_for(JobStartFailed("the worker is shutting down"))
    assert (started.status_code, started.status_message) == (
        StatusCode.INTERNAL,
        "the worker is shutting down",
    )


def test_a_group_of_several_errors_is_internal() -> None:
    status = status_for(ExceptionGroup("two", [JobNotFound("1"), ValueError("boom")]))
    assert (status.status_code, status.status_message) == (StatusCode.INTERNAL, INTERNAL_MESSAGE)


def test_a_huge_id_is_echoed_clipped_and_stalls_nobody(
    admin: worker_pb2_grpc.JobServiceStub, grpc_channel_for: Callable[[str], grpc.Channel]
) -> None:
    """An error message echoes the client's id in an HTTP/2 trailer. Echoed whole, a 1 MB id
    cost seconds of HPACK encoding on the event loop (measured: a 400 KB id stalled every
    other client for 20 s) and grpcio refuses trailers over 16 KiB anyway."""
    other = worker_pb2_grpc.JobServiceStub(grpc_channel_for("viewer-client"))
    huge = "7" * 1_000_000
    code, message = failure(lambda: admin.GetJob(worker_pb2.GetJobReq(id=huge), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    assert message == f"job not found: {'7' * 200}... (1000000 characters)"
    assert other.GetJobs(worker_pb2.EmptyRequest(), timeout=2).jobs == []
