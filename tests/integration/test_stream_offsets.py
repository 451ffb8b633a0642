"""GetJobsStream's ``offset`` (from a byte, from the end, past the end, with noFollow), a
stream resumed after a dropped connection, the job's status in the OK trailers, and the CLI's
``stream --offset`` / ``--tail`` that use them: through grpcio, our client and the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from jobworker.client import JobClient, RpcError, open_client
from tests.support import JOB_PYTHON, cli_flags, grpc_credentials, job_request

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

WAIT_S = 60  # only against a hang
OFFSET, STATUS, EXIT_CODE = "jobworker-offset", "jobworker-status", "jobworker-exit-code"
SEQ = b"".join(b"%d\n" % n for n in range(1, 20001))  # `seq 1 20000`: 108,894 bytes

# 20 MiB that never repeat: block i is the SHA-256 of its number. Written by the job in
# 32 KiB writes; the test computes the same bytes itself.
BIG_BLOCKS = 20 * 1024 * 1024 // 32
BIG_JOB = [
    "-c",
    "import hashlib, sys\n"
    "out = sys.stdout.buffer\n"
    f"for i in range(0, {BIG_BLOCKS}, 1024):\n"
    "    out.write(b''.join(hashlib.sha256(b'%d' % n).digest() for n in range(i, i + 1024)))\n",
]
BIG_SHA256 = hashlib.sha256(
    b"".join(hashlib.sha256(b"%d" % n).digest() for n in range(BIG_BLOCKS))
).hexdigest()

# Writes "first\n", then waits; on SIGTERM (StopJob) writes "second\n" and exits 0: bytes 6..12
# exist only once the test has stopped it.
ON_STOP = [
    "-c",
    "import signal, sys\n"
    "def stop(*_):\n"
    "    sys.stdout.write('second\\n'); sys.stdout.flush(); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('first', flush=True)\n"
    "while True:\n"
    "    signal.pause()\n",
]

Stub = worker_pb2_grpc.JobServiceStub


def channel_to(srv: ServerProc, test_pki: TestPKI, stem: str = "admin-client") -> grpc.Channel:
    """A channel with a connection of its own (not shared with other channels to the same
    server): closing it drops that connection."""
    return grpc.secure_channel(
        srv.address,
        grpc_credentials(test_pki, stem),
        options=[("grpc.use_local_subchannel_pool", 1)],
    )


@pytest.fixture(scope="module")
def admin(module_server: ServerProc, test_pki: TestPKI) -> Iterator[Stub]:
    with channel_to(module_server, test_pki) as channel:
        yield Stub(channel)


def ended_job(admin: Stub, command: str, args: list[str]) -> str:
    """A job run to its end (its stream followed to the end)."""
    job = admin.CreateJob(job_request(command, args), timeout=10)
    for _ in admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=WAIT_S):
        pass
    return job.id


@pytest.fixture(scope="module")
def seq_job(admin: Stub) -> str:
    return ended_job(admin, "seq", ["1", "20000"])


def read(
    admin: Stub, job_id: str, offset: int = 0, *, no_follow: bool = False
) -> tuple[bytes, dict[str, str], dict[str, str]]:
    """The whole stream: (bytes, its initial metadata, its trailing metadata)."""
    request = worker_pb2.GetJobsStreamReq(id=job_id, offset=offset, noFollow=no_follow)
    call = admin.GetJobsStream(request, timeout=WAIT_S)
    data = b"".join(chunk.payload for chunk in call)
    return data, dict(call.initial_metadata()), dict(call.trailing_metadata())


def failure(admin: Stub, job_id: str, offset: int, *, no_follow: bool = False) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        read(admin, job_id, offset, no_follow=no_follow)
    return caught.value


# -- offset ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 1000, 65536, len(SEQ) - 1, len(SEQ)])
@pytest.mark.parametrize("no_follow", [False, True])
def test_an_offset_starts_the_stream_at_that_byte(
    admin: Stub, seq_job: str, offset: int, no_follow: bool
) -> None:
    data, headers, trailers = read(admin, seq_job, offset, no_follow=no_follow)
    assert data == SEQ[offset:]
    # At the very end nothing is sent: a trailers-only response carries the offset too.
    where = headers if data else trailers
    assert where[OFFSET] == str(offset)
    assert (trailers[STATUS], trailers[EXIT_CODE]) == ("COMPLETED", "0")


@pytest.mark.parametrize("back", [1, 4096, 65537, len(SEQ), len(SEQ) + 1, 2**63])
@pytest.mark.parametrize("no_follow", [False, True])
def test_a_negative_offset_counts_from_the_end_clamped_at_the_first_byte(
    admin: Stub, seq_job: str, back: int, no_follow: bool
) -> None:
    data, headers, _ = read(admin, seq_job, -back, no_follow=no_follow)
    start = max(len(SEQ) - back, 0)
    assert data == SEQ[start:]
    assert headers[OFFSET] == str(start)  # where it started: the resolved offset


def test_no_follow_with_an_offset_sends_from_it_to_the_end_at_the_open(
    admin: Stub, test_pki: TestPKI, module_server: ServerProc
) -> None:
    busy = [
        "-c",
        "import sys, time\n"
        "for n in range(100_000):\n"
        "    sys.stdout.write(f'line {n}\\n'); sys.stdout.flush(); time.sleep(0.001)\n",
    ]
    job = admin.CreateJob(job_request(JOB_PYTHON, busy), timeout=10)
    try:
        follow = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=WAIT_S)
        seen = 0
        for chunk in follow:  # until it has written more than 2000 bytes
            seen += len(chunk.payload)
            if seen > 2000:
                break
        follow.cancel()
        data, headers, trailers = read(admin, job.id, 1000, no_follow=True)
        assert headers[OFFSET] == "1000"
        assert len(data) > 1000  # up to the end at the open, which was past byte 2000
        tail, tail_headers, _ = read(admin, job.id, -100, no_follow=True)
        assert len(tail) == 100  # the last 100 bytes at the open
        # Both ended while the job ran on, and said so.
        assert (trailers[STATUS], trailers[EXIT_CODE]) == ("RUNNING", "0")
        assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10).status == "RUNNING"
    finally:
        admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
    whole, _, _ = read(admin, job.id)
    assert whole[1000 : 1000 + len(data)] == data
    tail_start = int(tail_headers[OFFSET])
    assert tail_start >= 1000 + len(data) - 100  # from the end at its own open, not before
    assert whole[tail_start : tail_start + 100] == tail


# -- past the end ----------------------------------------------------------------------------


@pytest.mark.parametrize("no_follow", [False, True])
def test_an_offset_past_the_end_of_an_ended_job_is_out_of_range(
    admin: Stub, seq_job: str, no_follow: bool
) -> None:
    error = failure(admin, seq_job, len(SEQ) + 1, no_follow=no_follow)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == (
        f"offset {len(SEQ) + 1} is beyond the end of job {seq_job}'s output ({len(SEQ)} bytes)"
    )
    assert STATUS not in dict(error.trailing_metadata() or ())  # errors carry no status


def test_no_follow_past_the_end_of_a_live_job_ends_ok_with_nothing(admin: Stub) -> None:
    job = admin.CreateJob(job_request(JOB_PYTHON, ON_STOP), timeout=10)
    try:
        first = read_until(admin, job.id, b"first\n")
        data, _, trailers = read(admin, job.id, 1000, no_follow=True)
        assert first == b"first\n"
        assert data == b""  # not an error: those bytes may still come
        assert (trailers[OFFSET], trailers[STATUS]) == ("1000", "RUNNING")
    finally:
        admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)


def read_until(admin: Stub, job_id: str, expected: bytes) -> bytes:
    """Follow the job's output until it holds ``expected`` (then cancel)."""
    call = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=WAIT_S)
    received = b""
    for chunk in call:
        received += chunk.payload
        if len(received) >= len(expected):
            break
    call.cancel()
    return received


def streams_active(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^jobworker_streams_active (\S+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match.group(1)))


def wait_streams_active(address: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while streams_active(address) != count:
        assert time.monotonic() < deadline, f"not {count} streams open on the server"
        time.sleep(0.02)


def test_an_offset_past_the_end_of_a_live_job_waits_for_those_bytes(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--metrics-listen", "127.0.0.1:0") as srv:
        metrics = re.search(r"metrics on (\S+)", srv.log_text())
        assert metrics, srv.log_text()
        with channel_to(srv, test_pki) as channel:
            admin = Stub(channel)
            job = admin.CreateJob(job_request(JOB_PYTHON, ON_STOP), timeout=10)
            assert read_until(admin, job.id, b"first\n") == b"first\n"
            wait_streams_active(metrics.group(1), 0)  # that reader is released
            # Bytes 9.. and 100.. do not exist: the job writes no more until it is stopped.
            near = admin.GetJobsStream(
                worker_pb2.GetJobsStreamReq(id=job.id, offset=9), timeout=WAIT_S
            )
            far = admin.GetJobsStream(
                worker_pb2.GetJobsStreamReq(id=job.id, offset=100), timeout=WAIT_S
            )
            wait_streams_active(metrics.group(1), 2)  # both readers wait on the server
            assert admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10).status == "RUNNING"
            admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
            # "first\nsecond\n": byte 9 onwards came after the stream opened, and it got them.
            assert b"".join(chunk.payload for chunk in near) == b"ond\n"
            assert dict(near.trailing_metadata())[STATUS] == "STOPPED"
            # The job ended short of byte 100: those bytes will never be.
            with pytest.raises(grpc.RpcError) as caught:
                list(far)
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert caught.value.details() == (
                f"offset 100 is beyond the end of job {job.id}'s output (13 bytes)"
            )


# -- resume ----------------------------------------------------------------------------------


def test_a_stream_resumed_after_a_dropped_connection_is_byte_exact(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with channel_to(server, test_pki) as channel:
        job = Stub(channel).CreateJob(job_request(JOB_PYTHON, BIG_JOB), timeout=10)
    digest = hashlib.sha256()
    received = 0
    # Two drops mid-stream (while the job may still write), then a read to the end.
    for stop_after in (3 * 1024 * 1024, 11 * 1024 * 1024, None):
        channel = channel_to(server, test_pki)
        request = worker_pb2.GetJobsStreamReq(id=job.id, offset=received)
        call = Stub(channel).GetJobsStream(request, timeout=WAIT_S)
        for chunk in call:
            digest.update(chunk.payload)
            received += len(chunk.payload)
            if stop_after is not None and received >= stop_after:
                break
        if stop_after is not None:
            channel.close()  # the connection drops with the stream in flight
            continue
        assert dict(call.trailing_metadata())[STATUS] == "COMPLETED"
        channel.close()
    assert received == BIG_BLOCKS * 32
    assert digest.hexdigest() == BIG_SHA256


def connect(srv: ServerProc, test_pki: TestPKI) -> AbstractAsyncContextManager[JobClient]:
    return open_client(
        srv.address,
        cert=test_pki.cert("admin-client"),
        key=test_pki.key("admin-client"),
        ca=test_pki.ca_cert,
    )


async def test_our_client_resumes_at_its_offset_and_reads_the_trailers(
    server: ServerProc, test_pki: TestPKI
) -> None:
    code = "import sys\nsys.stdout.write(''.join(f'{n}\\n' for n in range(200_000))); sys.exit(3)"
    expected = b"".join(b"%d\n" % n for n in range(200_000))
    async with connect(server, test_pki) as client:
        job = await client.create(JOB_PYTHON, ["-c", code])
        async with client.stream(job.id, offset=-len(expected) - 5) as output:
            first = await output.__anext__()  # one chunk, then the connection goes
        resume_at = output.offset
    assert output.start_offset == 0  # the negative offset, clamped and resolved
    assert resume_at == len(first)
    async with connect(server, test_pki) as client:
        async with client.stream(job.id, offset=resume_at) as output:
            rest = b"".join([chunk async for chunk in output])
        assert first + rest == expected
        assert output.start_offset == resume_at
        assert output.offset == len(expected)
        assert output.trailers == {STATUS: "FAILED", EXIT_CODE: "3"}
        assert (output.status, output.exit_code) == ("FAILED", 3)
        # At the end exactly: nothing, still a status (a trailers-only response).
        async with client.stream(job.id, offset=len(expected)) as output:
            assert [chunk async for chunk in output] == []
        assert (output.status, output.exit_code, output.offset) == ("FAILED", 3, len(expected))
        with pytest.raises(RpcError) as caught:
            async with client.stream(job.id, offset=len(expected) + 1) as output:
                [chunk async for chunk in output]
    assert caught.value.code_name == "OUT_OF_RANGE"
    assert output.trailers == {}


# -- trailers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "status", "exit_code"),
    [
        ("true", [], "COMPLETED", "0"),  # no output: a trailers-only response
        ("sh", ["-c", "echo out; exit 3"], "FAILED", "3"),
    ],
)
def test_the_ok_trailers_carry_the_jobs_final_status_and_exit_code(
    admin: Stub, command: str, args: list[str], status: str, exit_code: str
) -> None:
    job = admin.CreateJob(job_request(command, args), timeout=10)
    _, _, trailers = read(admin, job.id)  # followed to the job's end
    assert (trailers[STATUS], trailers[EXIT_CODE]) == (status, exit_code)
    got = admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10)
    assert (got.status, str(got.exitCode)) == (status, exit_code)


def test_a_stopped_job_streams_stopped_and_its_exit_code(admin: Stub) -> None:
    job = admin.CreateJob(job_request("sleep", ["60"]), timeout=10)
    call = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=WAIT_S)
    stopped = admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
    assert list(call) == []
    trailers = dict(call.trailing_metadata())
    assert (trailers[STATUS], trailers[EXIT_CODE]) == ("STOPPED", str(stopped.exitCode))


def test_an_error_end_has_no_status_trailers(admin: Stub) -> None:
    error = failure(admin, "999", 0)
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "job not found: 999")
    assert not {STATUS, EXIT_CODE} & set(dict(error.trailing_metadata() or ()))


# -- CLI -------------------------------------------------------------------------------------

CLI = Callable[..., tuple[int, bytes, str]]


@pytest.fixture
def cli(
    test_pki: TestPKI, module_server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> CLI:
    def run(*argv: str) -> tuple[int, bytes, str]:
        capfdbinary.readouterr()
        code = main([*cli_flags(test_pki, module_server.address, "viewer-client"), *argv])
        out, err = capfdbinary.readouterr()
        return code, out, err.decode()

    return run


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (["--offset", "1000"], 1000),
        (["--from-offset=1000"], 1000),
        (["--offset", "-4096"], len(SEQ) - 4096),
        (["--offset=-999999999"], 0),
        (["--tail", "3"], len(SEQ) - len(b"19998\n19999\n20000\n")),
        (["--tail", "0"], len(SEQ)),
        (["--tail", "30000"], 0),
    ],
)
@pytest.mark.parametrize("follow", [[], ["--no-follow"]])
def test_cli_stream_offset_and_tail(
    cli: CLI, seq_job: str, flags: list[str], start: int, follow: list[str]
) -> None:
    code, out, err = cli("stream", *flags, *follow, seq_job)
    assert code == 0, err
    assert out == SEQ[start:]


def test_cli_tail_reads_further_back_for_long_lines(cli: CLI, admin: Stub) -> None:
    # Three 100 KB lines: the last two do not fit the first window read from the end.
    code = "import sys\nfor c in 'abc':\n    sys.stdout.write(c * 100_000 + '\\n')"
    job_id = ended_job(admin, JOB_PYTHON, ["-c", code])
    status, out, err = cli("stream", "--tail", "2", job_id)
    assert status == 0, err
    assert out == b"b" * 100_000 + b"\nc" + b"c" * 99_999 + b"\n"


def test_cli_json_offsets_count_from_the_jobs_first_byte(cli: CLI, seq_job: str) -> None:
    code, out, err = cli("-o", "json", "stream", "--offset", "-70000", seq_job)
    assert code == 0, err
    chunks = [json.loads(line) for line in out.splitlines()]
    assert chunks[0]["offset"] == len(SEQ) - 70000
    received = b""
    for chunk in chunks:
        assert chunk["offset"] == len(SEQ) - 70000 + len(received)
        received += base64.b64decode(chunk["payload"])
    assert received == SEQ[-70000:]


def test_cli_offset_past_the_end_of_an_ended_job_is_one_error_line(cli: CLI, seq_job: str) -> None:
    code, out, err = cli("stream", "--offset", str(len(SEQ) + 5), seq_job)
    assert (code, out) == (1, b"")
    assert err.splitlines(keepends=True)[-1] == (
        f"Error: offset {len(SEQ) + 5} is beyond the end of job {seq_job}'s output"
        f" ({len(SEQ)} bytes)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--offset", "x"],
        ["--tail", "-1"],
        ["--offset", "1", "--tail", "1"],
        ["--offset", str(2**63)],
    ],
)
def test_cli_bad_offsets_are_usage_errors(cli: CLI, argv: list[str]) -> None:
    code, out, err = cli("stream", *argv, "1")
    assert (code, out) == (2, b"")
    assert err.startswith("Error: argument --")


def test_cli_stream_reports_the_end_from_the_trailers_without_another_get_job(
    cli: CLI, admin: Stub, module_server: ServerProc
) -> None:
    job = admin.CreateJob(job_request("sh", ["-c", "echo out; exit 3"]), timeout=10)
    code, out, err = cli("stream", job.id)
    assert (code, out) == (1, b"out\n")
    assert err.endswith(f"Job {job.id} ended with status FAILED (exit code 3)\n")
    # A GetJob of ours after the CLI has exited: once its audit line is there, any GetJob
    # the CLI made is logged too. The CLI made one (before the stream), not two.
    admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10)
    pattern = rf"method=GetJob op=get_job job={job.id} outcome="
    log = module_server.wait_for_log(pattern, count=2)
    assert len(re.findall(pattern, log)) == 2
