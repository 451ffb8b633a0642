"""GetJobsStream with noFollow, and ``jobworker stream --follow=false`` which uses it: the
output that exists when the stream opens, then the end, even while the job keeps writing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from tests.support import JOB_PYTHON, grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

HANG_GUARD_S = 60  # only against a hang: a stream that followed would outlive the job first
# Writes a numbered line every 2 ms for up to 20 s, then END: a stream that follows the job
# instead of stopping at what existed when it opened would see END.
BUSY = [
    "-c",
    "import sys, time\n"
    "for n in range(10_000):\n"
    "    sys.stdout.write(f'line {n}\\n'); sys.stdout.flush(); time.sleep(0.002)\n"
    "print('END', flush=True)\n",
]


@pytest.fixture
def admin(test_pki: TestPKI, server: ServerProc) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client"))
    yield worker_pb2_grpc.JobServiceStub(channel)
    channel.close()


def busy_job(admin: worker_pb2_grpc.JobServiceStub) -> str:
    """A running busy job that has written at least its first line."""
    job = admin.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=BUSY), timeout=10)
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=HANG_GUARD_S)
    next(stream)
    stream.cancel()
    return job.id


def wait_for_output_beyond(admin: worker_pb2_grpc.JobServiceStub, job_id: str, size: int) -> None:
    """Follow the job's output until it holds more than ``size`` bytes, then cancel."""
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=HANG_GUARD_S)
    seen = 0
    for chunk in stream:
        seen += len(chunk.payload)
        if seen > size:
            break
    stream.cancel()
    assert seen > size


def whole_output(admin: worker_pb2_grpc.JobServiceStub, job_id: str) -> bytes:
    admin.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
    request = worker_pb2.GetJobsStreamReq(id=job_id)
    return b"".join(c.payload for c in admin.GetJobsStream(request, timeout=HANG_GUARD_S))


def test_no_follow_sends_what_exists_at_open_and_ends_while_the_job_writes_on(
    admin: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    # (Not compared with output.log's size: an outside stat races the pump's writes.)
    job_id = busy_job(admin)  # its first line was streamed: it exists at the open below
    request = worker_pb2.GetJobsStreamReq(id=job_id, noFollow=True)
    received = b"".join(c.payload for c in admin.GetJobsStream(request, timeout=HANG_GUARD_S))
    assert admin.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10).status == "RUNNING"
    assert received.startswith(b"line 0\n")
    assert b"END" not in received
    assert received.endswith(b"\n")  # the job writes whole lines: a cut would show
    # Let it write past what was sent: under its CPU quota, a job just started can be held
    # for tens of milliseconds, longer than the RPCs above take.
    wait_for_output_beyond(admin, job_id, len(received))
    whole = whole_output(admin, job_id)
    assert whole.startswith(received)
    assert len(whole) > len(received)  # the stream ended while the job wrote on


def test_no_follow_on_a_finished_job_sends_everything(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "seq 1 20000"]), timeout=10
    )
    follow = worker_pb2.GetJobsStreamReq(id=job.id)
    everything = b"".join(c.payload for c in admin.GetJobsStream(follow, timeout=HANG_GUARD_S))
    request = worker_pb2.GetJobsStreamReq(id=job.id, noFollow=True)
    received = b"".join(c.payload for c in admin.GetJobsStream(request, timeout=HANG_GUARD_S))
    assert received == everything == b"".join(b"%d\n" % n for n in range(1, 20001))


def test_no_follow_on_a_job_without_output_ends_at_once_with_nothing(
    admin: worker_pb2_grpc.JobServiceStub,
) -> None:
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["60"]), timeout=10)
    request = worker_pb2.GetJobsStreamReq(id=job.id, noFollow=True)
    assert list(admin.GetJobsStream(request, timeout=HANG_GUARD_S)) == []
    assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10).status == "RUNNING"
    admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)


@pytest.mark.parametrize("flag", ["--follow=false", "--no-follow"])
def test_cli_stream_without_follow_prints_the_output_so_far_of_a_busy_job_and_exits_0(
    test_pki: TestPKI,
    server: ServerProc,
    admin: worker_pb2_grpc.JobServiceStub,
    capfdbinary: pytest.CaptureFixture[bytes],
    flag: str,
) -> None:
    job_id = busy_job(admin)
    capfdbinary.readouterr()
    started = time.monotonic()
    code = main(
        [
            "--server",
            server.address,
            "--cert",
            str(test_pki.cert("viewer-client")),
            "--key",
            str(test_pki.key("viewer-client")),
            "--ca",
            str(test_pki.ca_cert),
            "--timeout",
            str(HANG_GUARD_S),
            "stream",
            flag,
            job_id,
        ]
    )
    out, err = capfdbinary.readouterr()
    assert code == 0, err
    assert err == b""  # no banner, no status: the job is still running
    assert out.startswith(b"line 0\n")
    assert b"END" not in out
    assert out.endswith(b"\n")
    assert admin.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10).status == "RUNNING", (
        f"took {time.monotonic() - started:.1f} s"
    )
    assert whole_output(admin, job_id).startswith(out)
