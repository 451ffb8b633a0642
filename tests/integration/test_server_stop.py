"""StopJob through the real server: a job in throttled IO dies at once, and an exit code that
is not known reads -1 on the wire."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.integration.conftest import SHUTDOWN_TIMEOUT_S, _cgroup_subtrees
from tests.support import describe_processes, grpc_credentials, in_throttled_io, pid_alive

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc


def _poll(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what()}"
        time.sleep(0.01)


def _stub(
    test_pki: TestPKI, srv: ServerProc
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


def _job_held_in_throttled_io(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> tuple[str, list[int]]:
    """Start a dd whose direct write waits in the kernel for its 1 KiB/s IO throttle; return
    its job id and the pids held (D state) once there are any."""
    args = ["if=/dev/zero", "of=f", "bs=64k", "count=1", "oflag=direct"]
    # The job's own start-up runs under its 1 KiB/s IO limit (placed first, then
    # isolated and exec'd): whatever of dd is not in the page cache is read at that
    # rate, which took over 30 s on a fresh machine. Read it in on the host first.
    subprocess.run(["dd", "--version"], check=True, capture_output=True)
    job = stub.CreateJob(
        worker_pb2.CreateJobReq(command="dd", args=args, maxIOBPS=1024), timeout=60
    )
    held: list[int] = []

    def dd_held() -> bool:
        held[:] = [pid for pid in server.children() if in_throttled_io(pid, b"dd")]
        return bool(held)

    # Generous: this bound only ends a failing run, and the spawn into six v1 hierarchies
    # waits in the kernel, longer on a loaded machine.
    _poll(
        dd_held,
        30,
        lambda: f"dd held by the IO throttle: {describe_processes(server.children())}",
    )
    return job.id, held


@pytest.mark.time_limit(120)
def test_stop_of_a_job_in_throttled_io_returns_at_once(
    server: ServerProc, test_pki: TestPKI
) -> None:
    channel, stub = _stub(test_pki, server)
    with channel:
        job_id, held = _job_held_in_throttled_io(stub, server)
        started = time.monotonic()
        stopped = stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
        took = time.monotonic() - started
        assert took < 3.0  # a correctness bound: without lifting the throttle, over ten seconds
        assert stopped.status == "STOPPED"
        assert stopped.exitCode in (137, 143)
        assert stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5).status == "STOPPED"
        assert not any(pid_alive(pid) for pid in held)


@pytest.mark.time_limit(120)
def test_a_shutdown_during_throttled_io_leaves_no_process_and_no_cgroup(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory() as srv:
        channel, stub = _stub(test_pki, srv)
        with channel:
            job_id, held = _job_held_in_throttled_io(stub, srv)
        everything = srv.children()  # read while the server lives: who they are
        started = time.monotonic()
        code = srv.stop()  # SIGTERM; fails after SHUTDOWN_TIMEOUT_S
        took = time.monotonic() - started
    assert code == 0, srv.log_text()
    assert took < SHUTDOWN_TIMEOUT_S
    assert set(held) <= set(everything)
    assert not [pid for pid in everything if pid_alive(pid)]
    assert not _cgroup_subtrees(srv.data_dir)
    record = json.loads((srv.data_dir / "jobs" / job_id / "job.json").read_bytes())
    assert (record["status"], record["reason"]) == ("STOPPED", "worker shutdown")


def test_an_unknown_exit_code_reads_minus_one(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory(expect_exit=None) as first:
        channel, stub = _stub(test_pki, first)
        with channel:
            stub.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["1000"]), timeout=10)
            running = stub.GetJob(worker_pb2.GetJobReq(id="1"), timeout=5)
            assert (running.status, running.exitCode) == ("RUNNING", 0)  # not ended: 0
        first.process.send_signal(signal.SIGKILL)  # a crash: the job's end is never seen
        first.process.wait()
    with server_factory("--data-dir", str(first.data_dir)) as second:
        channel, stub = _stub(test_pki, second)
        with channel:
            lost = stub.GetJob(worker_pb2.GetJobReq(id="1"), timeout=5)
            listed = stub.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs
        assert (lost.status, lost.exitCode) == ("LOST", -1)
        assert [(j.id, j.status, j.exitCode) for j in listed] == [("1", "LOST", -1)]


def test_a_stop_sent_with_the_create_stops_the_job(server: ServerProc, test_pki: TestPKI) -> None:
    """StopJob sent right behind CreateJob: it may find no job yet (NOT_FOUND, retried) or the
    job being spawned, which it must wait for and stop, never FAILED_PRECONDITION
    (INITIALIZING)."""
    channel, stub = _stub(test_pki, server)
    with channel:
        for attempt in range(1, 6):
            job_id = str(attempt)
            create = stub.CreateJob.future(
                worker_pb2.CreateJobReq(command="sleep", args=["1000"]), timeout=10
            )
            deadline = time.monotonic() + 10
            stopped = None
            while stopped is None:
                try:
                    stopped = stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
                except grpc.RpcError as exc:
                    refusal = (exc.code(), exc.details())
                    if refusal[0] is not grpc.StatusCode.NOT_FOUND:
                        pytest.fail(f"StopJob during the spawn answered {refusal}")
                    assert time.monotonic() < deadline, "the job never appeared"
            assert (stopped.status, stopped.exitCode) == ("STOPPED", 143)
            assert create.result().id == job_id
