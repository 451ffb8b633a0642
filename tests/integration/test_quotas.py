"""The spec's "Rate Limits and Quotas", through the real server and grpcio: running jobs
(server-wide, per client), resource ceilings per role, and the request rate per client.

Each refusal is checked for its code and message, and for leaving nothing behind: no job
directory, and the next job gets the next id.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from tests.support import JOB_PYTHON, cli_flags, job_request, wait_job_ended

if TYPE_CHECKING:
    from tests.integration.conftest import ServerFactory, ServerProc
    from tests.support import TestPKI

TIMEOUT = 15.0
RETRY_AFTER = "jobworker-retry-after-ms"

Stubs = Callable[[str], worker_pb2_grpc.JobServiceStub]


@pytest.fixture
def channels(
    grpc_credentials_for: Callable[[str], grpc.ChannelCredentials],
) -> Iterator[Callable[[ServerProc, str], grpc.Channel]]:
    """``(server, stem) -> grpc.Channel``, closed at teardown."""
    opened: list[grpc.Channel] = []

    def make(server: ServerProc, stem: str) -> grpc.Channel:
        opened.append(grpc.secure_channel(server.address, grpc_credentials_for(stem)))
        return opened[-1]

    yield make
    for channel in opened:
        channel.close()


def stubs_for(server: ServerProc, channels: Callable[[ServerProc, str], grpc.Channel]) -> Stubs:
    return lambda stem: worker_pb2_grpc.JobServiceStub(channels(server, stem))


def sleeper() -> worker_pb2.CreateJobReq:
    return job_request("sleep", ["100"])


def refused(
    stub: worker_pb2_grpc.JobServiceStub, request: worker_pb2.CreateJobReq
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(request, timeout=TIMEOUT)
    return caught.value


def job_dirs(server: ServerProc) -> set[str]:
    jobs = server.data_dir / "jobs"
    return {path.name for path in jobs.iterdir()} if jobs.is_dir() else set()


def stop(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=TIMEOUT)
    assert wait_job_ended(stub, job_id).status == "STOPPED"


def test_max_running_jobs_refuses_the_excess_and_starts_nothing(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    with server_factory("--max-running-jobs", "2") as server:
        stub = stubs_for(server, channels)
        admin, alice = stub("admin-client"), stub("alice-client")
        # Concurrent creates cannot overshoot: of five at once, exactly two start.
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(admin.CreateJob, sleeper(), timeout=TIMEOUT) for _ in range(5)]
            outcomes = [future.exception() or future.result() for future in futures]
        started = [o for o in outcomes if isinstance(o, worker_pb2.CreateJobRes)]
        errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert sorted(job.id for job in started) == ["1", "2"]
        assert len(errors) == 3
        for error in errors:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == "too many running jobs: 2 (limit 2)"
        # The limit is the server's: another client is refused as well.
        error = refused(alice, sleeper())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "too many running jobs: 2 (limit 2)"
        assert job_dirs(server) == {"1", "2"}
        jobs = admin.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs
        assert [(job.id, job.status) for job in jobs] == [("1", "RUNNING"), ("2", "RUNNING")]
        # A job that ends frees its place; the refusals used no id.
        stop(admin, "1")
        assert alice.CreateJob(sleeper(), timeout=TIMEOUT).id == "3"
        assert refused(admin, sleeper()).details() == "too many running jobs: 2 (limit 2)"
        assert job_dirs(server) == {"1", "2", "3"}


def test_the_per_client_limit_counts_each_identity_apart(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    with server_factory("--max-running-jobs-per-client", "1") as server:
        stub = stubs_for(server, channels)
        admin, alice = stub("admin-client"), stub("alice-client")
        assert admin.CreateJob(sleeper(), timeout=TIMEOUT).id == "1"
        error = refused(admin, sleeper())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "too many running jobs for admin: 1 (limit 1)"
        # alice (admin role too, her own CN) has a place of her own.
        job = alice.CreateJob(sleeper(), timeout=TIMEOUT)
        assert (job.id, job.owner) == ("2", "alice")
        assert refused(alice, sleeper()).details() == "too many running jobs for alice: 1 (limit 1)"
        assert job_dirs(server) == {"1", "2"}
        # A job that ended does not count: admin may start another, under the next id.
        stop(admin, "1")
        assert admin.CreateJob(job_request("true"), timeout=TIMEOUT).id == "3"
        # A job that ended by itself frees the place as well.
        assert wait_job_ended(admin, "3").status == "COMPLETED"
        assert admin.CreateJob(sleeper(), timeout=TIMEOUT).id == "4"


ROLE_LIMITS = "admin:cpu=50,memory=64,iobps=1000000,timeout=30;viewer:cpu=10,memory=8"


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"maxCPU": 50, "maxMemory": 128},
            "maxMemory 128 MB is above the limit for role admin: 64 MB",
        ),
        ({"maxMemory": 64}, "maxCPU 100% (the default) is above the limit for role admin: 50%"),
        ({"maxCPU": 50}, "maxMemory 512 MB (the default) is above the limit for role admin: 64 MB"),
        (
            {"maxCPU": 50, "maxMemory": 64, "maxIOBPS": 2_000_000},
            "maxIOBPS 2000000 B/s is above the limit for role admin: 1000000 B/s",
        ),
        (
            {"maxCPU": 50, "maxMemory": 64, "timeoutSeconds": 31},
            "timeoutSeconds 31 s is above the limit for role admin: 30 s",
        ),
    ],
)
def test_a_job_above_its_role_s_ceiling_is_refused_naming_limit_and_role(
    server_factory: ServerFactory,
    channels: Callable[[ServerProc, str], grpc.Channel],
    limits: dict[str, int],
    message: str,
) -> None:
    with server_factory("--role-limits", ROLE_LIMITS) as server:
        admin = stubs_for(server, channels)("admin-client")
        error = refused(admin, job_request("true", (), **limits))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        assert job_dirs(server) == set()
        assert (
            admin.CreateJob(job_request("true", maxCPU=50, maxMemory=64), timeout=TIMEOUT).id == "1"
        )


def test_a_job_within_its_role_s_ceiling_runs_under_it(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    """At the ceiling is allowed; "no limit" (IO 0, no time limit) becomes the ceiling;
    another role's ceiling does not apply; a role that may not create is refused for that,
    whatever its ceiling."""
    with server_factory("--role-limits", ROLE_LIMITS) as server:
        stub = stubs_for(server, channels)
        admin, viewer = stub("admin-client"), stub("viewer-client")
        job = admin.CreateJob(
            job_request(JOB_PYTHON, ["-c", "pass"], maxCPU=50, maxMemory=64), timeout=TIMEOUT
        )
        assert (job.maxCPU, job.maxMemory, job.maxIOBPS, job.timeoutSeconds) == (
            50,
            64,
            1_000_000,
            30,
        )
        # The viewer's ceiling (memory 8 MB, CPU 10 %) is not the admin's.
        assert (
            admin.CreateJob(
                job_request("true", maxCPU=20, maxMemory=32, timeoutSeconds=5), timeout=TIMEOUT
            ).timeoutSeconds
            == 5
        )
        error = refused(viewer, job_request("true", maxCPU=1, maxMemory=4))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == "role viewer is not allowed to perform operation create_job"
        assert wait_job_ended(admin, job.id).status == "COMPLETED"


def test_a_role_without_limits_and_a_server_without_them_refuse_nothing(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    with server_factory("--role-limits", "viewer:memory=8") as server:
        admin = stubs_for(server, channels)("admin-client")
        job = admin.CreateJob(
            job_request("true", maxMemory=1024, timeoutSeconds=0), timeout=TIMEOUT
        )
        assert (job.id, job.maxMemory, job.maxIOBPS, job.timeoutSeconds) == ("1", 1024, 0, 0)


def _get_jobs(stub: worker_pb2_grpc.JobServiceStub) -> grpc.RpcError | None:
    try:
        stub.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc
    return None


def test_the_rate_limit_lets_a_burst_through_then_refuses_with_a_retry_hint(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    burst = 5
    # One token every 2 s: the burst's calls (milliseconds each) take back nothing that counts.
    with server_factory("--rate-limit", f"0.5/s,{burst}") as server:
        stub = stubs_for(server, channels)
        admin, alice = stub("admin-client"), stub("alice-client")
        health = health_pb2_grpc.HealthStub(channels(server, "admin-client"))
        assert [_get_jobs(admin) for _ in range(burst)] == [None] * burst
        error = _get_jobs(admin)
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = str(error.details())
        assert details.startswith("rate limit exceeded: retry after ")
        assert details.endswith(" ms")
        hint = int(details.removeprefix("rate limit exceeded: retry after ").removesuffix(" ms"))
        assert 0 < hint <= 2000
        trailers = dict(error.trailing_metadata() or ())
        assert trailers[RETRY_AFTER] == str(hint)
        # A stream counts too (once, at its open): refused as well, with the hint.
        with pytest.raises(grpc.RpcError) as caught:
            list(admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id="1"), timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert RETRY_AFTER in dict(caught.value.trailing_metadata() or ())
        # Health checks are never limited, and another client has its own bucket.
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert _get_jobs(alice) is None
        # Once the bucket has a token again, calls pass: poll, bounded by a deadline.
        started = time.monotonic()
        deadline = started + hint / 1000 + 10
        while (error := _get_jobs(admin)) is not None:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "still rate limited past the hint"
            time.sleep(0.05)  # polling the limiter, with a deadline
        # One token came back, not a burst: the next call is refused again.
        assert _get_jobs(admin) is not None
        assert server.log_text().count("outcome=RESOURCE_EXHAUSTED") >= 3


def test_without_a_rate_limit_nothing_is_limited(
    server_factory: ServerFactory, channels: Callable[[ServerProc, str], grpc.Channel]
) -> None:
    with server_factory() as server:
        admin = stubs_for(server, channels)("admin-client")
        assert [_get_jobs(admin) for _ in range(50)] == [None] * 50


def test_the_cli_reports_each_quota_as_one_error_line(
    server_factory: ServerFactory, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # A burst of four, then one call per 100 s: the test's calls never see a refill.
    with server_factory("--max-running-jobs", "1", "--rate-limit", "0.01/s,4") as srv:
        connection = cli_flags(test_pki, srv.address)
        capfdbinary.readouterr()
        assert main([*connection, "create", "sleep", "100"]) == 0
        assert main([*connection, "create", "sleep", "100"]) == 1
        refused = capfdbinary.readouterr().err.decode()
        assert refused.splitlines()[-1] == "Error: too many running jobs: 1 (limit 1)"
        # Each list is one or more calls: within a few, the burst of four is spent.
        codes: list[int] = []
        while not codes or codes[-1] == 0:
            assert len(codes) < 5, "the rate limit never refused a call"
            capfdbinary.readouterr()
            codes.append(main([*connection, "list"]))
        assert codes[-1] == 1
        limited = capfdbinary.readouterr().err.decode().splitlines()
        assert len(limited) == 1
        assert re.fullmatch(r"Error: rate limit exceeded: retry after \d+ ms", limited[0])
