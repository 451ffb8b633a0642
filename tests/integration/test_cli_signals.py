"""The ``jobworker`` CLI as a process: Ctrl+C, a server that dies, a closed stdout.

These run ``python -m jobworker`` in a subprocess because signals and pipes are the point.
Servers run without cgroups: nothing here is about limits, and a server starting elsewhere
on the machine sweeps every ``jobworker/*`` cgroup (killing other servers' jobs).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli.commands import STREAM_RETRY_PAUSES_S
from tests.support import grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

WAIT_S = 10.0
SIGINT_EXIT_S = 1.0  # the brief: Ctrl+C ends a following stream within a second
CONNECTION_LOST_EXIT_S = 3.0  # "within a few seconds"
PRINT_THEN_SLEEP = "import time\nprint('started', flush=True)\ntime.sleep(60)"


def cli_command(test_pki: TestPKI, address: str, *argv: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobworker",
        "--server",
        address,
        "--cert",
        str(test_pki.cert("admin-client")),
        "--key",
        str(test_pki.key("admin-client")),
        "--ca",
        str(test_pki.ca_cert),
        *argv,
    ]


def stub_for(
    test_pki: TestPKI, address: str
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


def read_until(stream: IO[bytes], expected: bytes, timeout: float = WAIT_S) -> bytes:
    """Read a pipe until ``expected`` appears (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    data = b""
    while expected not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{expected!r} not seen; got {data!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"EOF before {expected!r}; got {data!r}"
            data += chunk
    return data


@contextlib.contextmanager
def cli_process(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = proc.wait(timeout)
    return code, time.monotonic() - started


@pytest.fixture
def plain_server(server_factory: ServerFactory) -> Iterator[ServerProc]:
    with server_factory("--cgroups", "off") as srv:
        yield srv


def test_ctrl_c_during_stream_exits_130_quickly_and_ends_the_server_stream(
    test_pki: TestPKI, plain_server: ServerProc
) -> None:
    channel, stub = stub_for(test_pki, plain_server.address)
    with channel:
        job = stub.CreateJob(
            worker_pb2.CreateJobReq(command="python3", args=["-c", PRINT_THEN_SLEEP])
        )
        try:
            with cli_process(cli_command(test_pki, plain_server.address, "stream", job.id)) as proc:
                assert proc.stdout is not None
                assert proc.stderr is not None
                assert read_until(proc.stdout, b"started\n") == b"started\n"
                proc.send_signal(signal.SIGINT)
                code, elapsed = wait_exit(proc, WAIT_S)
                stderr = proc.stderr.read().decode()
            assert code == 130
            assert elapsed < SIGINT_EXIT_S
            assert "Traceback" not in stderr
            assert stderr == f"Streaming logs for job {job.id} (Press Ctrl+C to exit):\n"
            plain_server.wait_for_log(
                rf"method=GetJobsStream op=stream_job job={job.id} outcome=CANCELLED"
            )
            # the job itself is untouched by the client going away
            assert stub.GetJob(worker_pb2.GetJobReq(id=job.id)).status == "RUNNING"
        finally:
            stub.StopJob(worker_pb2.StopJobReq(id=job.id))


def test_ctrl_c_while_connecting_exits_130_without_traceback(test_pki: TestPKI) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never speaks TLS
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with cli_process(cli_command(test_pki, address, "--timeout", "30", "list")) as proc:
            conn, _ = silent.accept()  # the CLI is now waiting for the TLS handshake
            with conn:
                proc.send_signal(signal.SIGINT)
                code, elapsed = wait_exit(proc, WAIT_S)
                assert proc.stderr is not None
                assert proc.stdout is not None
                stderr = proc.stderr.read().decode()
                stdout = proc.stdout.read()
    assert (code, stdout) == (130, b"")
    assert elapsed < SIGINT_EXIT_S
    assert "Traceback" not in stderr
    assert "Error" not in stderr


@pytest.mark.parametrize("retry", [False, True])
def test_server_killed_mid_stream_ends_the_cli_with_connection_lost(
    test_pki: TestPKI, server_factory: ServerFactory, retry: bool
) -> None:
    """Without --no-retry the CLI tries to resume three times first (0.5 + 1 + 2 s of
    pauses, each reconnection refused at once), with a notice each time."""
    flags = [] if retry else ["--no-retry"]
    with server_factory("--cgroups", "off", expect_exit=None) as server:
        channel, stub = stub_for(test_pki, server.address)
        with channel:
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="python3", args=["-c", PRINT_THEN_SLEEP])
            )
        started = rf"job {job.id} started: pid (\d+)"
        job_pid = int(re.findall(started, server.wait_for_log(started))[0])
        try:
            argv = cli_command(test_pki, server.address, "stream", *flags, job.id)
            with cli_process(argv) as proc:
                assert proc.stdout is not None
                assert proc.stderr is not None
                read_until(proc.stdout, b"started\n")
                server.process.kill()
                server.process.wait()
                code, elapsed = wait_exit(proc, WAIT_S)
                stderr = proc.stderr.read().decode()
            assert code == 3
            retry_pauses = sum(STREAM_RETRY_PAUSES_S) if retry else 0.0
            assert elapsed < CONNECTION_LOST_EXIT_S + retry_pauses
            assert stderr.endswith("Error: connection lost\n")
            notices = [line for line in stderr.splitlines() if "reconnecting" in line]
            assert len(notices) == (len(STREAM_RETRY_PAUSES_S) if retry else 0)
            assert "Traceback" not in stderr
        finally:  # the job runs in its own session; nobody is left to stop it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job_pid, signal.SIGKILL)


def test_graceful_server_shutdown_mid_stream_is_exit_4_server_shutting_down(
    test_pki: TestPKI, server_factory: ServerFactory
) -> None:
    with server_factory("--cgroups", "off") as server:
        channel, stub = stub_for(test_pki, server.address)
        with channel:
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="python3", args=["-c", PRINT_THEN_SLEEP])
            )
        with cli_process(cli_command(test_pki, server.address, "stream", job.id)) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            read_until(proc.stdout, b"started\n")
            assert server.stop() == 0  # SIGTERM: a graceful shutdown
            code, _ = wait_exit(proc, WAIT_S)
            stderr = proc.stderr.read().decode()
    assert code == 4, stderr
    assert stderr == (
        f"Streaming logs for job {job.id} (Press Ctrl+C to exit):\nError: server shutting down\n"
    )


def test_closed_stdout_ends_the_stream_quietly(test_pki: TestPKI, plain_server: ServerProc) -> None:
    channel, stub = stub_for(test_pki, plain_server.address)
    endless = "import sys\nwhile True:\n    sys.stdout.write('y' * 8191 + '\\n')"
    with channel:
        job = stub.CreateJob(worker_pb2.CreateJobReq(command="python3", args=["-c", endless]))
        try:
            with cli_process(cli_command(test_pki, plain_server.address, "stream", job.id)) as proc:
                assert proc.stdout is not None
                assert proc.stderr is not None
                assert read_until(proc.stdout, b"yyyyyyyyyy").startswith(b"yyyyyyyyyy")
                proc.stdout.close()  # what "| head -c 10" does once it has its bytes
                code, _ = wait_exit(proc, WAIT_S)
                stderr = proc.stderr.read().decode()
            assert code == 0
            assert stderr == f"Streaming logs for job {job.id} (Press Ctrl+C to exit):\n"
            # The server-side stream ended. (Its outcome is racy on the server: a reset that
            # lands while the handler is sending is reported as INTERNAL there.)
            plain_server.wait_for_log(rf"method=GetJobsStream op=stream_job job={job.id} outcome=")
        finally:
            stub.StopJob(worker_pb2.StopJobReq(id=job.id))


def test_following_writes_output_as_it_arrives(
    test_pki: TestPKI, plain_server: ServerProc, tmp_path: Path
) -> None:
    code = (  # the gate is in the job's work dir (its cwd), the one host path a job sees
        "import os, sys, time\n"
        "print('first', flush=True)\n"
        "while not os.path.exists('gate'): time.sleep(0.01)\n"
        "sys.stdout.write('second, no newline'); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    channel, stub = stub_for(test_pki, plain_server.address)
    with channel:
        job = stub.CreateJob(worker_pb2.CreateJobReq(command="python3", args=["-c", code]))
        gate = plain_server.data_dir / "jobs" / job.id / "work" / "gate"
        try:
            with cli_process(cli_command(test_pki, plain_server.address, "stream", job.id)) as proc:
                assert proc.stdout is not None
                assert read_until(proc.stdout, b"first\n") == b"first\n"
                gate.touch()  # the stream is delivering: what comes next can only come live
                assert read_until(proc.stdout, b"second, no newline") == b"second, no newline"
                assert proc.poll() is None
        finally:
            stub.StopJob(worker_pb2.StopJobReq(id=job.id))
