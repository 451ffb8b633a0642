"""Retention through the real server: finished jobs deleted beyond --retain-finished-count
(oldest first) and after --retain-finished, never a running job; a swept job is NOT_FOUND
`job not found: N`, its files gone, and each sweep that deleted something logs one line."""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.engine import JobRecord, JobStatus, Limits
from jobworker.engine.store import JobStore
from tests.support import JOB_PYTHON, grpc_credentials, job_request, wait_job_ended

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

SWEEP = ("--retention-interval", "0.1")  # sweeps this often: the polls below see them soon
WAIT_S = 20.0
SLEEPER = job_request(JOB_PYTHON, ["-c", "import time; time.sleep(100)"])
SHORT = job_request(JOB_PYTHON, ["-c", "print('done')"])


def connect(
    test_pki: TestPKI, server: ServerProc
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


def is_gone(stub: worker_pb2_grpc.JobServiceStub, server: ServerProc, job_id: str) -> bool:
    """GetJob answers NOT_FOUND `job not found: N` and the job's directory is gone."""
    try:
        stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10)
    except grpc.RpcError as exc:
        error = exc
    else:
        return False
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"job not found: {job_id}",
    )
    return not (server.data_dir / "jobs" / job_id).exists()


def wait_gone(stub: worker_pb2_grpc.JobServiceStub, server: ServerProc, job_id: str) -> float:
    """Poll (with a deadline) until the job was swept; the wall-clock time it was seen so."""
    deadline = time.monotonic() + WAIT_S
    while not is_gone(stub, server, job_id):
        assert time.monotonic() < deadline, f"job {job_id} was not deleted:\n{server.log_text()}"
        time.sleep(0.02)  # polling the server, with a deadline
    return time.time()


def status(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> str:
    return str(stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10).status)


def deleted_lines(server: ServerProc) -> list[str]:
    return re.findall(r"retention: deleted \d+ finished jobs \([^)]*\)", server.log_text())


def test_by_count_the_oldest_finished_jobs_go_and_a_running_job_stays(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--retain-finished-count", "2", *SWEEP) as server:
        channel, stub = connect(test_pki, server)
        with channel:
            running = stub.CreateJob(SLEEPER, timeout=10).id
            finished = []
            for _ in range(5):
                job = stub.CreateJob(SHORT, timeout=10)
                wait_job_ended(stub, job.id)
                finished.append(job.id)
            for job_id in finished[:3]:
                wait_gone(stub, server, job_id)
            assert [status(stub, job_id) for job_id in finished[3:]] == ["COMPLETED"] * 2
            assert status(stub, running) == "RUNNING"  # older than all, but running
            listed = stub.ListJobs(worker_pb2.ListJobsReq(), timeout=10)
            assert [job.id for job in listed.jobs] == [running, *finished[3:]]
            # Ended, it is the oldest finished job: the next sweep deletes it.
            stub.StopJob(worker_pb2.StopJobReq(id=running), timeout=10)
            wait_gone(stub, server, running)
            assert [status(stub, job_id) for job_id in finished[3:]] == ["COMPLETED"] * 2
            # Ids are never reused: the next job gets a new one.
            assert int(stub.CreateJob(SHORT, timeout=10).id) == int(finished[-1]) + 1
    lines = deleted_lines(server)
    assert lines
    assert all(line.endswith("; beyond the newest 2)") for line in lines)
    assert sum(int(line.split()[2]) for line in lines) >= 4
    assert "Traceback" not in server.log_text()


def write_finished(data_dir: Path, count: int, ended: dt.datetime) -> None:
    """``count`` finished records (ids 1..count), written before the server starts."""
    store = JobStore(data_dir)
    for number in range(1, count + 1):
        store.prepare(str(number))
        store.save(
            JobRecord(
                id=str(number),
                command="/bin/true",
                args=(),
                limits=Limits(cpu_percent=100, memory_mb=512, io_bps=0, pids_max=1024),
                status=JobStatus.COMPLETED,
                start_time=ended,
                end_time=ended,
                exit_code=0,
            ),
            durable=False,
        )
        store.output_path(str(number)).touch()


def test_a_server_sweeps_at_start_in_one_sweep_with_one_log_line(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    write_finished(tmp_path / "data", 5, dt.datetime.now(dt.UTC))
    # A day-long interval: only the sweep at start can have deleted anything.
    with server_factory("--retain-finished-count", "2", "--retention-interval", "86400") as srv:
        srv.wait_for_log(r"retention: deleted")
        channel, stub = connect(test_pki, srv)
        with channel:
            for job_id in ("1", "2", "3"):
                assert is_gone(stub, srv, job_id)
            assert [job.id for job in stub.ListJobs(worker_pb2.ListJobsReq(), timeout=10).jobs] == [
                "4",
                "5",
            ]
    assert deleted_lines(srv) == ["retention: deleted 3 finished jobs (1-3; beyond the newest 2)"]


def test_by_age_set_in_the_environment_a_finished_job_goes_after_its_time(
    server_factory: ServerFactory, test_pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_WORKER_RETAIN_FINISHED", "1s")  # the setting, from the environment
    monkeypatch.setenv("JOB_WORKER_RETENTION_INTERVAL", "0.1")
    with server_factory() as server:
        channel, stub = connect(test_pki, server)
        with channel:
            running = stub.CreateJob(SLEEPER, timeout=10).id
            job = stub.CreateJob(SHORT, timeout=10)
            end = dt.datetime.fromisoformat(wait_job_ended(stub, job.id).endTime).timestamp()
            gone_at = wait_gone(stub, server, job.id)
            # endTime has whole seconds (rounded down): the job went at least 1 s after it.
            assert gone_at >= end + 1
            assert status(stub, running) == "RUNNING"  # older than 1 s, but running
            stub.StopJob(worker_pb2.StopJobReq(id=running), timeout=10)
            wait_gone(stub, server, running)
    lines = deleted_lines(server)
    assert lines[0] == f"retention: deleted 1 finished jobs ({job.id}; ended over 1s ago)"
    assert "retention: deleting finished jobs ended over 1s ago" in server.log_text()


def test_retention_is_off_by_default(server: ServerProc, test_pki: TestPKI) -> None:
    channel, stub = connect(test_pki, server)
    with channel:
        job = stub.CreateJob(SHORT, timeout=10)
        wait_job_ended(stub, job.id)
        assert status(stub, job.id) == "COMPLETED"
    assert "retention:" not in server.log_text()
