"""--max-output-bytes through the real server: the job runs on, its stream is exactly the kept
bytes and one marker line, its reason says so, usage.outputBytes counts all it wrote (also
after a restart), and a job that writes exactly the cap is not truncated."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from tests.support import JOB_PYTHON, cli_flags, grpc_credentials, job_request, wait_job_ended

if TYPE_CHECKING:
    import pytest

    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

CAP = 4096
MARKER = b"\n[jobworker: output truncated at 4096 bytes]\n"
# Writes chunks of the given sizes (separate writes), then exits 3: it ran to its end.
WRITER = "import os, sys\nfor n in map(int, sys.argv[1:]):\n    os.write(1, b'x' * n)\nsys.exit(3)"
WAIT_S = 20.0


def stub_for(
    test_pki: TestPKI, server: ServerProc
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


def whole_output(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> tuple[bytes, dict[str, str]]:
    """The job's stream from byte 0 to its end, and its trailing metadata."""
    call = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=30)
    data = b"".join(chunk.payload for chunk in call)
    return data, dict(call.trailing_metadata() or ())


def test_output_past_the_cap_is_discarded_and_the_job_runs_to_its_end(
    server_factory: ServerFactory, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    sizes = ["3000", "2000", "1000000"]  # the cap falls inside the second write
    with server_factory("--max-output-bytes", str(CAP)) as server:
        channel, stub = stub_for(test_pki, server)
        with channel:
            job = stub.CreateJob(job_request(JOB_PYTHON, ["-c", WRITER, *sizes]), timeout=10)
            ended = wait_job_ended(stub, job.id)
            data, trailers = whole_output(stub, job.id)
    assert data == b"x" * CAP + MARKER
    assert (ended.status, ended.exitCode) == ("FAILED", 3)  # not killed: it exited by itself
    assert ended.reason == f"exited with status 3; output truncated at {CAP} bytes"
    assert ended.usage.outputBytes == 3000 + 2000 + 1_000_000  # what it wrote
    assert trailers["jobworker-status"] == "FAILED"
    assert (server.data_dir / "jobs" / job.id / "output.log").read_bytes() == data
    # After a restart: the same record, the same output.
    with server_factory("--data-dir", str(server.data_dir)) as again:
        channel, stub = stub_for(test_pki, again)
        with channel:
            loaded = stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10)
            assert whole_output(stub, job.id)[0] == data
        capfdbinary.readouterr()
        code = main(
            [
                *cli_flags(test_pki, again.address),
                *("get", job.id),
            ]
        )
        out = capfdbinary.readouterr().out.decode()
    assert loaded.usage.outputBytes == 1_005_000
    assert loaded.reason == ended.reason
    assert code == 0
    assert f"Reason: exited with status 3; output truncated at {CAP} bytes\n" in out
    assert "output 1,005,000 bytes" in out


def test_a_running_job_keeps_running_past_the_cap_and_its_stream_ends_with_it(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    code = "import os, time\nos.write(1, b'y' * 10000)\ntime.sleep(100)"
    with server_factory("--max-output-bytes", str(CAP)) as server:
        channel, stub = stub_for(test_pki, server)
        with channel:
            job = stub.CreateJob(job_request(JOB_PYTHON, ["-c", code]), timeout=10)
            stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=30)
            deadline = time.monotonic() + WAIT_S
            while True:
                running = stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10)
                if running.usage.outputBytes == 10000:
                    break
                assert time.monotonic() < deadline, running
                time.sleep(0.02)  # polling the job, with a deadline
            assert running.status == "RUNNING"
            assert running.reason == f"output truncated at {CAP} bytes"
            stopped = stub.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
            followed = b"".join(chunk.payload for chunk in stream)  # ends with the job
    assert followed == b"y" * CAP + MARKER
    assert stopped.status == "STOPPED"
    assert stopped.reason == f"stopped by request; output truncated at {CAP} bytes"
    assert stopped.usage.outputBytes == 10000


def test_a_job_writing_exactly_the_cap_is_not_truncated(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--max-output-bytes", str(CAP)) as server:
        channel, stub = stub_for(test_pki, server)
        with channel:
            request = job_request(JOB_PYTHON, ["-c", WRITER, "4000", "96"])
            job = stub.CreateJob(request, timeout=10)
            ended = wait_job_ended(stub, job.id)
            data, _ = whole_output(stub, job.id)
    assert data == b"x" * CAP
    assert ended.reason == "exited with status 3"
    assert ended.usage.outputBytes == CAP


def test_without_the_flag_nothing_is_capped(module_server: ServerProc, test_pki: TestPKI) -> None:
    channel, stub = stub_for(test_pki, module_server)
    with channel:
        job = stub.CreateJob(job_request(JOB_PYTHON, ["-c", WRITER, "300000"]), timeout=10)
        ended = wait_job_ended(stub, job.id)
        data, _ = whole_output(stub, job.id)
    assert data == b"x" * 300000
    assert ended.usage.outputBytes == 300000
    assert ended.reason == "exited with status 3"
