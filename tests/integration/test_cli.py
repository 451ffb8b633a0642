"""The ``jobworker`` CLI against a live server: every spec example, output formats, errors.

``main(argv)`` runs in-process (it runs its own trio.run, so these are plain sync tests) with
fd-level capture. One server serves the whole module; tests use the ids they create. A grpcio
channel is the independent witness for what the server actually got.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from jobworker import pki
from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from tests.support import grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

WAIT_S = 10.0
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def cli_server(module_server: ServerProc) -> ServerProc:
    return module_server


@pytest.fixture(scope="module")
def stub(test_pki: TestPKI, cli_server: ServerProc) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(cli_server.address, grpc_credentials(test_pki, "admin-client"))
    yield worker_pb2_grpc.JobServiceStub(channel)
    channel.close()


@dataclass
class Run:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()


CLI = Callable[..., Run]


@pytest.fixture
def cli(
    test_pki: TestPKI, cli_server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> CLI:
    """Run ``jobworker --server S --cert/--key/--ca <stem> ARGS...`` in-process."""

    def run(*argv: str, stem: str = "admin-client", connection: bool = True) -> Run:
        prefix = (
            [
                "--server",
                cli_server.address,
                "--cert",
                str(test_pki.cert(stem)),
                "--key",
                str(test_pki.key(stem)),
                "--ca",
                str(test_pki.ca_cert),
            ]
            if connection
            else []
        )
        capfdbinary.readouterr()
        code = main([*prefix, *argv])
        out, err = capfdbinary.readouterr()
        return Run(code, out, err.decode())

    return run


def wait_ended(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> worker_pb2.GetJobRes:
    deadline = time.monotonic() + WAIT_S
    while True:
        job = stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5)
        if job.status not in ("INITIALIZING", "RUNNING"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.02)


def wait_output(stub: worker_pb2_grpc.JobServiceStub, job_id: str, expected: bytes) -> None:
    """Read the job's stream (grpcio) until it starts with ``expected``, then cancel it."""
    stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=WAIT_S)
    received = b""
    for chunk in stream:
        received += chunk.payload
        if len(received) >= len(expected):
            break
    stream.cancel()
    assert received[: len(expected)] == expected


def created_id(run: Run) -> str:
    match = re.search(r"^ID: (\d+)$", run.text, re.MULTILINE)
    assert match, run.text
    return match.group(1)


def python_job(code: str) -> list[str]:
    return ["python3", "-u", "-c", code]


# -- create ----------------------------------------------------------------------------------


def test_create_prints_the_spec_block_and_passes_the_limits(cli: CLI, stub) -> None:
    run = cli("create", "--max-cpu=50", "--max-memory=512", "python3", "-c", "print(1)")
    assert run.code == 0, run.err
    assert run.err == ""
    assert re.fullmatch(
        rf"Job created:\nID: \d+\nCommand: python3 -c 'print\(1\)'\nStatus: RUNNING\n"
        rf"StartTime: {RFC3339}\n",
        run.text,
    ), run.text
    job = wait_ended(stub, created_id(run))
    assert (job.command, list(job.args)) == ("python3", ["-c", "print(1)"])
    assert (job.maxCPU, job.maxMemory, job.maxIOBPS) == (50, 512, 0)


def test_create_limit_flags_with_a_space_and_io(cli: CLI, stub) -> None:
    run = cli("create", "--max-cpu", "30", "--max-iobps", "1048576", "true")
    assert run.code == 0, run.err
    job = wait_ended(stub, created_id(run))
    assert (job.maxCPU, job.maxIOBPS) == (30, 1048576)


@pytest.mark.parametrize(
    ("argv", "command", "args"),
    [
        (["echo", "hello world"], "echo", ["hello world"]),
        (["--max-cpu=50", "echo", "x"], "echo", ["x"]),
        (["bash", "-c", "sleep 10 && echo done"], "bash", ["-c", "sleep 10 && echo done"]),
        # options after the command belong to the job, even ones create itself knows
        (
            ["echo", "-v", "--max-cpu=5", "-o", "json", "--"],
            "echo",
            ["-v", "--max-cpu=5", "-o", "json", "--"],
        ),
    ],
)
def test_everything_after_the_command_reaches_the_job_untouched(
    cli: CLI, stub, argv: list[str], command: str, args: list[str]
) -> None:
    run = cli("create", *argv)
    assert run.code == 0, run.err
    job_id = created_id(run)
    assert f"Command: {shlex.join([command, *args])}\n" in run.text
    job = stub.GetJob(worker_pb2.GetJobReq(id=job_id))
    assert (job.command, list(job.args)) == (command, args)
    if job.status == "RUNNING" and command == "bash":
        stub.StopJob(worker_pb2.StopJobReq(id=job_id))


def test_job_options_reach_the_process(cli: CLI, stub) -> None:
    # the spec's "python3 -u script.py -v": -u for python, -v for the script
    run = cli("create", "python3", "-u", "-c", "import sys; print(sys.argv[1:])", "-v", "--x=1")
    assert run.code == 0, run.err
    job_id = created_id(run)
    assert wait_ended(stub, job_id).status == "COMPLETED"
    assert cli("stream", job_id).out == b"['-v', '--x=1']\n"


def test_a_command_starting_with_a_dash_after_double_dash(cli: CLI) -> None:
    run = cli("create", "--", "-weird-cmd", "-x")
    assert (run.code, run.out) == (1, b"")
    assert run.err == "Error: command not found in PATH: -weird-cmd\n"


# -- get / list / stop -----------------------------------------------------------------------


def test_get_prints_the_spec_block_with_exit_code_once_ended(cli: CLI, stub) -> None:
    job_id = created_id(cli("create", "--max-cpu=50", "sh", "-c", "exit 3"))
    job = wait_ended(stub, job_id)
    run = cli("get", job_id)
    assert run.code == 0, run.err
    spec_block, _, ours = run.text.partition("Reason: ")
    assert spec_block == (
        f"Id: {job_id}\nCommand: sh -c 'exit 3'\nStatus: FAILED\nStarted At: {job.startTime}\n"
        f"Ended At: {job.endTime}\nMaxCPU: 50\nMaxMemory: 512\nMaxIOBPS: 0\nExitCode: 3\n"
    )
    assert ours.startswith("exited with status 3\nOwner: admin\nUsage: cpu ")
    assert ours.endswith(", output 0 bytes\n")


def test_get_of_a_running_job_has_an_empty_end_and_no_exit_code(cli: CLI, stub) -> None:
    job_id = created_id(cli("create", "sleep", "30"))
    try:
        run = cli("get", job_id)
        assert run.code == 0, run.err
        assert "Status: RUNNING\n" in run.text
        assert "\nEnded At: \n" in run.text
        assert "ExitCode" not in run.text
    finally:
        stub.StopJob(worker_pb2.StopJobReq(id=job_id))


def test_list_prints_one_spec_line_per_job(cli: CLI, stub) -> None:
    job_id = created_id(cli("create", "echo", "hello"))
    job = wait_ended(stub, job_id)
    run = cli("list")
    assert run.code == 0, run.err
    lines = run.text.splitlines()
    assert f"{job_id} COMPLETED StartTime: {job.startTime} Command: echo hello" in lines
    every = stub.GetJobs(worker_pb2.EmptyRequest()).jobs
    assert len(lines) == len(every)
    assert all(
        re.fullmatch(rf"\d+ [A-Z]+ StartTime: {RFC3339} Command: .+", line) for line in lines
    )


def test_stop_prints_the_spec_block_then_refuses_a_second_stop(cli: CLI) -> None:
    job_id = created_id(cli("create", "sleep", "30"))
    run = cli("stop", job_id)
    assert run.code == 0, run.err
    assert run.text == f"Job stopped successfully:\nID: {job_id}\nStatus: STOPPED\n"
    again = cli("stop", job_id)
    assert (again.code, again.out) == (1, b"")
    assert again.err == f"Error: job is not running: {job_id} (current status: STOPPED)\n"


HOSTILE_ARGS = ["\n2 COMPLETED StartTime: x Command: echo harmless\n", "\x1b[31m"]
HOSTILE_ESCAPED = "$'\\n2 COMPLETED StartTime: x Command: echo harmless\\n' $'\\x1b[31m'"


def test_control_characters_show_as_one_escaped_row_in_list_and_get(cli: CLI, stub) -> None:
    run = cli("create", "echo", *HOSTILE_ARGS)
    assert run.code == 0, run.err
    assert b"\x1b" not in run.out
    job_id = created_id(run)
    job = wait_ended(stub, job_id)
    listed = cli("list")
    assert listed.code == 0, listed.err
    assert b"\x1b" not in listed.out
    lines = listed.text.splitlines()
    assert len(lines) == len(stub.GetJobs(worker_pb2.EmptyRequest()).jobs)
    assert [line for line in lines if "harmless" in line] == [
        f"{job_id} COMPLETED StartTime: {job.startTime} Command: echo {HOSTILE_ESCAPED}"
    ]
    got = cli("get", job_id)
    assert b"\x1b" not in got.out
    assert f"\nCommand: echo {HOSTILE_ESCAPED}\nStatus: COMPLETED\n" in got.text
    assert len(got.text.splitlines()) == 12  # the spec's nine, then Reason, Owner, Usage
    # JSON stays exact: the arguments as the job got them
    assert json.loads(cli("get", job_id, "-o", "json").out)["args"] == HOSTILE_ARGS


def test_error_messages_are_escaped_too(cli: CLI) -> None:
    run = cli("create", "no-such-\x1b[31m-tool\n2")
    assert (run.code, run.out) == (1, b"")
    assert run.err == "Error: command not found in PATH: no-such-\\x1b[31m-tool\\n2\n"


# -- JSON ------------------------------------------------------------------------------------

JOB_FIELDS = [
    "id",
    "command",
    "args",
    "maxCPU",
    "maxMemory",
    "maxIOBPS",
    "status",
    "startTime",
    "endTime",
    "exitCode",
    "reason",
    "owner",
    "usage",
    "timeoutSeconds",
    "env",
    "workingDir",
]


@pytest.mark.parametrize("where", ["global", "command"])
def test_json_output_of_every_command(cli: CLI, stub, where: str) -> None:
    def run_json(*argv: str) -> object:
        full = (
            ["-o", "json", *argv] if where == "global" else [argv[0], "--output", "json", *argv[1:]]
        )
        run = cli(*full)
        assert run.code == 0, run.err
        return json.loads(run.out)

    created = run_json("create", "--max-memory=64", "sleep", "30")
    assert isinstance(created, dict)
    assert list(created) == JOB_FIELDS
    assert created["args"] == ["30"]
    assert created["maxMemory"] == 64
    job_id = created["id"]
    got = run_json("get", job_id)
    assert isinstance(got, dict)
    assert list(got) == JOB_FIELDS
    assert got["status"] == "RUNNING"
    assert got["endTime"] == ""
    listed = run_json("list")
    assert isinstance(listed, list)
    assert next(job for job in listed if job["id"] == job_id)["command"] == "sleep"
    stopped = run_json("stop", job_id)
    job = stub.GetJob(worker_pb2.GetJobReq(id=job_id))
    assert isinstance(stopped, dict)
    usage = stopped.pop("usage")
    assert stopped == {
        "id": job_id,
        "status": "STOPPED",
        "endTime": job.endTime,
        "exitCode": job.exitCode,
        "reason": "stopped by request",
    }
    assert usage["outputBytes"] == "0"  # int64 fields are strings in proto3 JSON


# -- stream ----------------------------------------------------------------------------------


def test_stream_follows_a_job_to_its_end_with_the_banner_on_stderr(cli: CLI, stub) -> None:
    code = "import time\nfor n in range(5):\n    print('line', n); time.sleep(0.05)"
    job_id = created_id(cli("create", *python_job(code)))
    run = cli("stream", job_id)
    assert run.code == 0, run.err
    assert run.out == b"".join(b"line %d\n" % n for n in range(5))
    assert run.err == f"Streaming logs for job {job_id} (Press Ctrl+C to exit):\n"


@pytest.mark.parametrize("flag", [[], ["--follow"], ["-f"], ["--follow=true"]])
def test_stream_follow_spellings(cli: CLI, stub, flag: list[str]) -> None:
    job_id = created_id(cli("create", "echo", "hi"))
    run = cli("stream", job_id, *flag)
    assert (run.code, run.out) == (0, b"hi\n")


def test_stream_stdout_is_the_jobs_bytes_exactly(cli: CLI, stub) -> None:
    expected = bytes(range(256)) * 4096 + b"\x00\r\n\xff no newline at the end"
    code = (
        "import sys\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 4096)\n"
        "sys.stdout.buffer.write(b'\\x00\\r\\n\\xff no newline at the end')"
    )
    job_id = created_id(cli("create", *python_job(code)))
    run = cli("stream", job_id)
    assert run.code == 0, run.err
    assert len(run.out) == len(expected)
    assert run.out == expected


@pytest.mark.parametrize("where", ["global", "command"])
def test_stream_json_is_one_object_per_chunk_with_offset_and_base64(
    cli: CLI, stub, where: str
) -> None:
    expected = bytes(range(256)) * 1024 + b"\n\x1b[31m end"  # > 64 KiB: several messages
    code = (
        "import sys\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 1024)\n"
        "sys.stdout.buffer.write(b'\\n\\x1b[31m end')"
    )
    job_id = created_id(cli("create", *python_job(code)))
    wait_ended(stub, job_id)
    argv = ["-o", "json", "stream", job_id] if where == "global" else ["stream", job_id, "-o=json"]
    run = cli(*argv)
    assert run.code == 0, run.err
    lines = run.out.split(b"\n")
    assert lines[-1] == b""  # every object ends its line
    chunks = [json.loads(line) for line in lines[:-1]]
    assert len(chunks) >= len(expected) // (64 * 1024)
    received = b""
    for chunk in chunks:
        assert list(chunk) == ["offset", "payload"]
        assert chunk["offset"] == len(received)
        payload = base64.b64decode(chunk["payload"], validate=True)
        assert payload
        received += payload
    assert received == expected


def test_stream_of_a_failed_job_exits_1_after_the_output(cli: CLI) -> None:
    job_id = created_id(cli("create", "sh", "-c", "echo out; echo err >&2; exit 3"))
    run = cli("stream", job_id)
    assert run.code == 1
    assert run.out == b"out\nerr\n"
    assert run.err.endswith(f"Job {job_id} ended with status FAILED (exit code 3)\n")


@pytest.mark.parametrize("spelling", ["--follow=false", "--no-follow", "--follow=0"])
def test_no_follow_prints_exactly_the_output_so_far(cli: CLI, stub, spelling: str) -> None:
    code = "import time\nprint('first')\nprint('second')\ntime.sleep(60)"
    job_id = created_id(cli("create", *python_job(code)))
    try:
        wait_output(stub, job_id, b"first\nsecond\n")
        started = time.monotonic()
        run = cli("stream", spelling, job_id)
        elapsed = time.monotonic() - started
        assert run.code == 0, run.err
        assert run.out == b"first\nsecond\n"
        assert run.err == ""  # no banner: nothing to interrupt
        assert elapsed < 3.0
        assert stub.GetJob(worker_pb2.GetJobReq(id=job_id)).status == "RUNNING"
    finally:
        stub.StopJob(worker_pb2.StopJobReq(id=job_id))


def test_no_follow_on_a_job_that_never_pauses_stops_after_the_timeout(cli: CLI, stub) -> None:
    code = "import sys\nwhile True:\n    sys.stdout.write('y' * 1023 + '\\n'); sys.stdout.flush()"
    job_id = created_id(cli("create", *python_job(code)))
    try:
        wait_output(stub, job_id, b"y" * 1023 + b"\n")
        started = time.monotonic()
        run = cli("--timeout", "1", "stream", "--no-follow", job_id)
        elapsed = time.monotonic() - started
        assert run.code == 0, run.err
        assert run.out.startswith(b"y" * 1023 + b"\n")
        assert elapsed < 3.0
    finally:
        stub.StopJob(worker_pb2.StopJobReq(id=job_id))


def test_no_follow_on_an_ended_job_prints_everything(cli: CLI, stub) -> None:
    code = "for n in range(1000):\n    print('line', n)"
    job_id = created_id(cli("create", *python_job(code)))
    wait_ended(stub, job_id)
    run = cli("stream", "--follow=false", job_id)
    assert run.code == 0, run.err
    assert run.out == b"".join(b"line %d\n" % n for n in range(1000))


def test_stream_of_an_unknown_job_is_one_error_line(cli: CLI) -> None:
    run = cli("stream", "999")
    assert (run.code, run.out) == (1, b"")
    assert run.err == "Error: job not found: 999\n"


@pytest.mark.parametrize(("stem", "role"), [("guest-client", "guest"), ("noou-client", "none")])
@pytest.mark.parametrize("flags", [[], ["--no-follow"]])
def test_a_denied_stream_names_the_stream_operation(
    cli: CLI, stub, stem: str, role: str, flags: list[str]
) -> None:
    job_id = created_id(cli("create", "echo", "secret"))
    wait_ended(stub, job_id)
    run = cli("stream", *flags, job_id, stem=stem)
    assert (run.code, run.out) == (1, b"")
    assert run.err == f"Error: role {role} is not allowed to perform operation stream_job\n"


# -- errors and exit codes -------------------------------------------------------------------


def test_not_found(cli: CLI) -> None:
    run = cli("get", "999")
    assert (run.code, run.out, run.err) == (1, b"", "Error: job not found: 999\n")


def test_permission_denied_for_the_viewer(cli: CLI) -> None:
    run = cli("create", "echo", "x", stem="viewer-client")
    assert (run.code, run.out) == (1, b"")
    assert run.err == "Error: role viewer is not allowed to perform operation create_job\n"
    assert cli("list", stem="viewer-client").code == 0  # viewers may read


def test_command_not_found(cli: CLI) -> None:
    run = cli("create", "invalid-command")
    assert (run.code, run.err) == (1, "Error: command not found in PATH: invalid-command\n")


def test_unreachable_server_is_exit_3(cli: CLI) -> None:
    with socket.socket() as sock:  # bound, never listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        run = cli("--server", f"127.0.0.1:{port}", "list")  # a later --server wins
    assert (run.code, run.out) == (3, b"")
    assert run.err == f"Error: cannot connect to 127.0.0.1:{port}: connection refused\n"


def test_no_answer_within_the_timeout_is_exit_3(cli: CLI) -> None:
    # accepts TCP (the kernel completes it), never answers the TLS handshake
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        run = cli("--server", f"127.0.0.1:{port}", "--timeout", "0.5", "list")
        elapsed = time.monotonic() - started
    assert (run.code, run.out) == (3, b"")
    assert run.err == f"Error: cannot connect to 127.0.0.1:{port}: no answer within 0.5 s\n"
    assert elapsed < 5.0  # the timeout, not a hang (bounded loosely: a shared machine)


# Ignores SIGTERM: a StopJob then waits out the whole grace period before its SIGKILL.
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(100)\n"
)
SLOW_GRACE_S = 4.0


def test_a_call_unanswered_within_the_timeout_on_a_live_connection_is_exit_3(
    server_factory: ServerFactory, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The connection is up (TLS and HTTP/2 done, the call sent) but the answer takes longer
    than --timeout: a StopJob that waits out the grace period of a job ignoring SIGTERM."""
    with server_factory("--stop-grace", str(SLOW_GRACE_S)) as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
        with channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="python3", args=["-c", IGNORES_SIGTERM]),
                timeout=10,
            )
            wait_output(stub, job.id, b"ready\n")  # its SIGTERM handler is in place
            capfdbinary.readouterr()
            started = time.monotonic()
            code = main(
                [
                    *("--server", srv.address, "--timeout", "0.5"),
                    *("--cert", str(test_pki.cert("admin-client"))),
                    *("--key", str(test_pki.key("admin-client")), "--ca", str(test_pki.ca_cert)),
                    *("stop", job.id),
                ]
            )
            elapsed = time.monotonic() - started
            out, err = capfdbinary.readouterr()
            assert (code, out) == (3, b"")
            assert err.decode() == "Error: deadline exceeded: no answer within 0.5 s\n"
            assert elapsed < SLOW_GRACE_S  # it gave up at its timeout, not at the answer
            # The stop itself went on: SIGKILL once the grace period was over.
            final = wait_ended(stub, job.id)
            assert (final.status, final.exitCode) == ("STOPPED", 137)


def test_wrong_ca_is_exit_3_with_verify_failed(cli: CLI, test_pki: TestPKI, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.Authority.create("another").cert_pem)
    run = cli("--ca", str(tmp_path / "ca.pem"), "list")  # a later --ca wins
    assert (run.code, run.out) == (3, b"")
    assert run.err.startswith("Error: certificate verify failed: ")
    assert run.err.count("\n") == 1


@pytest.mark.parametrize("stem", ["foreign-client", "expired-client"])
def test_certificate_refused_by_the_server_is_exit_3_not_a_hang(cli: CLI, stem: str) -> None:
    started = time.monotonic()
    run = cli("list", stem=stem)
    assert time.monotonic() - started < 3.0
    assert (run.code, run.out) == (3, b"")
    reason = {"foreign-client": "unknown CA", "expired-client": "certificate expired"}[stem]
    assert run.err == f"Error: the server refused our certificate: {reason}\n"


def test_missing_certificate_file(cli: CLI, tmp_path: Path) -> None:
    missing = tmp_path / "client-cert.pem"
    run = cli("--cert", str(missing), "list")
    assert (run.code, run.out) == (3, b"")
    assert run.err == f"Error: missing certificate file at {missing}\n"


@pytest.fixture
def bad_files(test_pki: TestPKI, tmp_path: Path) -> dict[str, Path]:
    """Files that are not what --cert/--key/--ca need, each in its own way."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)  # opening it would block: it must be refused before
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(test_pki.key("admin-client").read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return {"garbage": garbage, "empty": empty, "fifo": fifo, "encrypted": encrypted}


@pytest.mark.parametrize(
    ("flag", "bad", "message"),
    [
        ("--cert", "dir", "certificate file is a directory: {path}"),
        ("--key", "dir", "key file is a directory: {path}"),
        ("--ca", "dir", "CA certificate file is a directory: {path}"),
        ("--cert", "fifo", "certificate file is not a regular file: {path}"),
        ("--cert", "garbage", "cannot load certificate {path}: not a PEM certificate"),
        ("--cert", "empty", "cannot load certificate {path}: not a PEM certificate"),
        ("--cert", "key", "cannot load certificate {path}: not a PEM certificate"),
        ("--key", "garbage", "cannot load key {path}: not a PEM private key"),
        ("--key", "cert", "cannot load key {path}: not a PEM private key"),
        ("--key", "other-key", "key {path} does not match certificate {cert}"),
        ("--key", "encrypted", "cannot load key {path}: it is encrypted (give an unencrypted key)"),
        ("--ca", "garbage", "cannot load CA certificate {path}: not a PEM certificate"),
    ],
)
def test_unusable_certificate_files_get_a_clear_message(
    cli: CLI, test_pki: TestPKI, bad_files: dict[str, Path], flag: str, bad: str, message: str
) -> None:
    path = {
        "dir": Path("/tmp"),
        "key": test_pki.key("admin-client"),
        "cert": test_pki.cert("admin-client"),
        "other-key": test_pki.key("viewer-client"),
        **bad_files,
    }[bad]
    run = cli(flag, str(path), "list")  # a later flag wins
    assert (run.code, run.out) == (3, b"")
    expected = message.format(path=path, cert=test_pki.cert("admin-client"))
    assert run.err == f"Error: {expected}\n"


def test_usage_errors_are_exit_2_with_one_line(cli: CLI) -> None:
    for argv in (
        ["get"],
        ["frobnicate"],
        ["create", "--max-cpu=lots", "x"],
        ["stream", "--follow=maybe", "1"],
    ):
        run = cli(*argv, connection=False)
        assert run.code == 2, argv
        assert run.out == b""
        assert run.err.startswith("Error: "), run.err
        assert run.err.count("\n") == 1, run.err
        assert "Traceback" not in run.err


# -- configuration: flags > environment > defaults -------------------------------------------


@pytest.fixture
def viewer_certs_dir(test_pki: TestPKI, tmp_path: Path) -> Path:
    """A JOB_WORKER_CERT_PATH-style dir whose client-* pair is the viewer's."""
    directory = tmp_path / "viewer-certs"
    directory.mkdir()
    shutil.copy(test_pki.cert("viewer-client"), directory / "client-cert.pem")
    shutil.copy(test_pki.key("viewer-client"), directory / "client-key.pem")
    shutil.copy(test_pki.ca_cert, directory / "ca-cert.pem")
    return directory


def test_environment_gives_server_and_certificates(
    cli: CLI, cli_server: ServerProc, viewer_certs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_WORKER_SERVER", cli_server.address)
    monkeypatch.setenv("JOB_WORKER_CERT_PATH", str(viewer_certs_dir))
    assert cli("list", connection=False).code == 0
    run = cli("create", "echo", "x", connection=False)  # the viewer pair from the env dir
    assert run.err == "Error: role viewer is not allowed to perform operation create_job\n"


def test_flags_beat_the_environment(
    cli: CLI, test_pki: TestPKI, viewer_certs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_WORKER_SERVER", "127.0.0.1:1")  # nothing there
    monkeypatch.setenv("JOB_WORKER_CERT_PATH", str(viewer_certs_dir))
    run = cli("create", "echo", "x")  # --server and the admin pair given as flags
    assert run.code == 0, run.err
    only_env = cli("list", connection=False)
    assert only_env.code == 3
    assert only_env.err == "Error: cannot connect to 127.0.0.1:1: connection refused\n"


def test_defaults_are_certs_in_the_working_directory(
    cli: CLI,
    cli_server: ServerProc,
    test_pki: TestPKI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOB_WORKER_SERVER", raising=False)
    monkeypatch.delenv("JOB_WORKER_CERT_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "certs").symlink_to(test_pki.dir)  # holds client-*.pem (admin) and ca-cert.pem
    run = cli("--server", cli_server.address, "create", "echo", "x", connection=False)
    assert run.code == 0, run.err
    (tmp_path / "certs").unlink()
    missing = cli("--server", cli_server.address, "list", connection=False)
    assert missing.err == "Error: missing certificate file at certs/client-cert.pem\n"


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "examples"),
    [
        (
            [],
            [
                'jobworker create echo "hello world"',
                "--server=prod.example.com:50051",
                "JOB_WORKER_CERT_PATH",
            ],
        ),
        (
            ["create"],
            [
                "jobworker create --max-cpu=50 python3 script.py",
                'jobworker create bash -c "sleep 10 && echo done"',
            ],
        ),
        (["get"], ["jobworker get 1"]),
        (["list"], ["jobworker list"]),
        (["stop"], ["jobworker stop 1"]),
        (["stream"], ["jobworker stream 1", "jobworker stream --follow=false 1"]),
    ],
)
def test_help_on_every_command_shows_the_spec_examples(
    cli: CLI, argv: list[str], examples: list[str]
) -> None:
    run = cli(*argv, "--help", connection=False)
    assert run.code == 0
    for example in examples:
        assert example in run.text
    if not argv:
        assert "exit status:" in run.text
        assert "3    cannot connect" in run.text
        assert "4    the server is shutting down" in run.text
