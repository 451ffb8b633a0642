"""Signals with a running job: none of them leaves a job, a record or a cgroup behind."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import pid_alive

if TYPE_CHECKING:
    from tests.integration.conftest import ServerFactory, ServerProc

Credentials = Callable[[str], grpc.ChannelCredentials]


def _record(srv: ServerProc, job_id: str) -> dict[str, object]:
    data = json.loads((srv.data_dir / "jobs" / job_id / "job.json").read_text())
    assert isinstance(data, dict)
    return data


def _sleep_job(srv: ServerProc, credentials: Credentials) -> tuple[str, int]:
    """Start ``sleep 100``; return its job id and pid."""
    with grpc.secure_channel(srv.address, credentials("admin-client")) as channel:
        stub = worker_pb2_grpc.JobServiceStub(channel)
        job = stub.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["100"]), timeout=10)
    [pid] = [p for p in srv.children() if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"]
    return job.id, pid


@pytest.fixture
def running(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> Iterator[tuple[ServerProc, str, int]]:
    # start_server checks at exit: code 0, no process left, this server's cgroups removed.
    with server_factory() as srv:
        job_id, pid = _sleep_job(srv, grpc_credentials_for)
        yield srv, job_id, pid
        assert not pid_alive(pid)
        assert _record(srv, job_id)["status"] == "STOPPED"


def test_sighup_is_logged_and_the_server_and_its_job_run_on(
    running: tuple[ServerProc, str, int], grpc_credentials_for: Credentials
) -> None:
    srv, job_id, pid = running
    srv.process.send_signal(signal.SIGHUP)
    srv.wait_for_log("SIGHUP received")
    assert srv.process.poll() is None
    assert pid_alive(pid)
    with grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel:
        stub = worker_pb2_grpc.JobServiceStub(channel)
        assert stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10).status == "RUNNING"
    assert srv.stop(signal.SIGTERM) == 0
    assert _record(srv, job_id)["reason"] == "worker shutdown"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("gap_s", [0.0, 0.05, 0.3])
def test_two_shutdown_signals_still_shut_down_cleanly(
    running: tuple[ServerProc, str, int], signum: int, gap_s: float
) -> None:
    """The second signal lands during or after the shutdown: exit 0 (not 130, not 143)."""
    srv, job_id, _pid = running
    srv.process.send_signal(signum)
    time.sleep(gap_s)  # the gap between the two signals is what is tested, not a sync
    if srv.process.poll() is None:
        srv.process.send_signal(signum)
    assert srv.stop(signum) == 0
    assert _record(srv, job_id)["reason"] == "worker shutdown"
