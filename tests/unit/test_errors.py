"""The one error tree: what the server sends for each error, what the client raises, and the
one way to look inside exception groups."""

from __future__ import annotations

import pytest
from purerpc.grpclib.status import StatusCode

from jobworker import errors
from jobworker.client import ConnectError, ConnectionLost, RpcError
from jobworker.server.errors import INTERNAL_MESSAGE, status_for


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (errors.JobNotFound("7"), StatusCode.NOT_FOUND, "job not found: 7"),
        (
            errors.JobNotRunning("7", "FAILED"),
            StatusCode.FAILED_PRECONDITION,
            "job is not running: 7 (current status: FAILED)",
        ),
        (
            errors.CommandNotFound("nope"),
            StatusCode.INVALID_ARGUMENT,
            "command not found in PATH: nope",
        ),
        (errors.DataDiskFull(), StatusCode.RESOURCE_EXHAUSTED, "data disk full"),
        (errors.OutputLost("3"), StatusCode.DATA_LOSS, "output of job 3 is missing"),
        (
            errors.OffsetOutOfRange("3", 20, 12),
            StatusCode.OUT_OF_RANGE,
            "offset 20 is beyond the end of job 3's output (12 bytes)",
        ),
        (
            errors.PermissionDenied("viewer", "stop_job"),
            StatusCode.PERMISSION_DENIED,
            "role viewer is not allowed to perform operation stop_job",
        ),
        (
            errors.TooManyRunningJobs(4, 4),
            StatusCode.RESOURCE_EXHAUSTED,
            "too many running jobs: 4 (limit 4)",
        ),
        (
            errors.TooManyRunningJobs(2, 2, "alice"),
            StatusCode.RESOURCE_EXHAUSTED,
            "too many running jobs for alice: 2 (limit 2)",
        ),
        (
            errors.TooManyRunningJobs(1, 1, "x" * 300),
            StatusCode.RESOURCE_EXHAUSTED,
            f"too many running jobs for {'x' * 200}... (300 characters): 1 (limit 1)",
        ),
        (
            errors.AboveRoleLimit("maxMemory", 16384, 8192, "MB", "viewer", default=False),
            StatusCode.INVALID_ARGUMENT,
            "maxMemory 16384 MB is above the limit for role viewer: 8192 MB",
        ),
        (
            errors.AboveRoleLimit("maxCPU", 100, 50, "%", "admin", default=True),
            StatusCode.INVALID_ARGUMENT,
            "maxCPU 100% (the default) is above the limit for role admin: 50%",
        ),
        (
            errors.RateLimited(250),
            StatusCode.RESOURCE_EXHAUSTED,
            "rate limit exceeded: retry after 250 ms",
        ),
        (RpcError(StatusCode.ABORTED, "try again"), StatusCode.ABORTED, "try again"),
        (RpcError("UNAVAILABLE", "later"), StatusCode.UNAVAILABLE, "later"),
    ],
)
def test_the_server_sends_each_error_as_its_status(
    error: errors.JobWorkerError, code: StatusCode, message: str
) -> None:
    status = status_for(error)
    assert (status.status_code, status.status_message) == (code, message)


def test_an_error_inside_a_nursery_group_is_sent_as_itself() -> None:
    status = status_for(BaseExceptionGroup("nursery", [errors.JobNotFound("9")]))  # type: ignore[arg-type]
    assert (status.status_code, status.status_message) == (StatusCode.NOT_FOUND, "job not found: 9")


def test_an_unexpected_error_is_internal_without_its_text() -> None:
    status = status_for(KeyError("/var/lib/jobworker/secret"))
    assert (status.status_code, status.status_message) == (StatusCode.INTERNAL, INTERNAL_MESSAGE)


def test_every_client_error_is_an_rpc_error_with_the_code_grpc_clients_report() -> None:
    for error in (
        ConnectError("cannot connect to h:1: connection refused"),
        ConnectionLost(),
        errors.ServerShuttingDown(),
    ):
        assert isinstance(error, RpcError)
        assert isinstance(error, errors.JobWorkerError)
        assert error.code_name == "UNAVAILABLE"
    assert errors.DeadlineExceeded(2).code_name == "DEADLINE_EXCEEDED"
    assert str(errors.DeadlineExceeded(2)) == "deadline exceeded: no answer within 2 s"
    assert str(ConnectionLost("protocol error")) == "connection lost: protocol error"
    assert str(RpcError("NOT_FOUND", "")) == "not found"  # a status without a message


def test_leaves_and_unwrap() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    nested = BaseExceptionGroup("outer", [a, BaseExceptionGroup("inner", [b, c])])
    assert errors.leaves(nested) == [a, b, c]
    assert errors.leaves(a) == [a]
    assert errors.unwrap(BaseExceptionGroup("x", [BaseExceptionGroup("y", [a])])) is a
    assert errors.unwrap(nested) is nested  # more than one: nothing to strip


def test_deleting_a_running_job_is_a_failed_precondition_in_the_spec_s_words() -> None:
    status = status_for(errors.JobIsRunning("12"))
    assert (status.status_code, status.status_message) == (
        StatusCode.FAILED_PRECONDITION,
        "job is running: 12",
    )
