"""Graceful shutdown: SIGTERM/SIGINT with jobs and streams active ends everything, exits 0,
leaves no process; a second signal does not cut it short."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import JOB_PYTHON, pid_alive

if TYPE_CHECKING:
    from tests.integration.conftest import ServerFactory, ServerProc

Credentials = Callable[[str], grpc.ChannelCredentials]
CHATTY = ["-c", "import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.01)\n"]


class StreamReader(threading.Thread):
    """Reads one GetJobsStream to its end in the background; keeps the final status."""

    def __init__(self, stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
        super().__init__(daemon=True)
        self.call = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=60)
        self.first = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self.received = 0

    def run(self) -> None:
        try:
            for chunk in self.call:
                self.received += len(chunk.payload)
                self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
            self.details = exc.details()
        finally:
            self.first.set()


def record(srv: ServerProc, job_id: str) -> dict[str, object]:
    data = json.loads((srv.data_dir / "jobs" / job_id / "job.json").read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_with_jobs_and_streams_active_ends_everything_and_exits_0(
    server_factory: ServerFactory, grpc_credentials_for: Credentials, signum: int
) -> None:
    with server_factory() as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials_for("admin-client"))
        admin = worker_pb2_grpc.JobServiceStub(channel)
        sleeper = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["60"]))
        chatty = admin.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=CHATTY))
        readers = [StreamReader(admin, job.id) for job in (chatty, chatty, sleeper)]
        for reader in readers:
            reader.start()
        assert readers[0].first.wait(10)
        assert readers[1].first.wait(10)
        processes = srv.children()
        assert len(processes) >= 2  # the two jobs (plus any shim)

        started = time.monotonic()
        assert srv.stop(signum) == 0
        assert time.monotonic() - started < 5

        for reader in readers:
            reader.join(5)
            assert not reader.is_alive(), "a stream client hung after the server exited"
            # The server's own status, sent before the connection closed (not grpcio's
            # "Socket closed" for a connection that just dropped).
            assert (reader.code, reader.details) == (
                grpc.StatusCode.UNAVAILABLE,
                "server shutting down",
            )
        assert [pid for pid in processes if pid_alive(pid)] == []
        for job in (sleeper, chatty):
            assert record(srv, job.id)["status"] == "STOPPED"
            assert record(srv, job.id)["reason"] == "worker shutdown"
        log = srv.log_text()
        assert f"{signal.Signals(signum).name} received: shutting down" in log
        assert "Traceback" not in log
        channel.close()


def test_a_second_signal_does_not_abandon_the_jobs(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    # The job ignores SIGTERM: the graceful path waits the whole grace period, then SIGKILLs.
    with server_factory("--stop-grace", "2") as srv:
        with grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel:
            admin = worker_pb2_grpc.JobServiceStub(channel)
            job = admin.CreateJob(
                worker_pb2.CreateJobReq(
                    command="sh", args=["-c", "trap '' TERM; echo ready; exec sleep 60"]
                )
            )
            for chunk in admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10):
                if b"ready" in chunk.payload:
                    break
        processes = srv.children()
        srv.process.send_signal(signal.SIGTERM)
        srv.wait_for_log("connections closed; stopping jobs")
        assert srv.stop(signal.SIGTERM) == 0
        assert "SIGTERM received again: already shutting down" in srv.log_text()
        assert [pid for pid in processes if pid_alive(pid)] == []
        assert (record(srv, job.id)["status"], record(srv, job.id)["exit_code"]) == ("STOPPED", 137)
