"""A data dir that cannot hurt its server: the loader refuses what is not a small regular file
of ours (one WARNING naming it), a missing output log is reported, an unusable ``jobs`` is
one line and exit 2, and SIGTERM during a long load exits at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main as cli_main
from jobworker.engine.model import JobRecord, JobStatus, Limits, utc_now
from jobworker.engine.store import MAX_RECORD_BYTES, JobStore
from tests.integration.conftest import (
    LISTENING_RE,
    SHUTDOWN_TIMEOUT_S,
    _cgroup_subtrees,
    start_server,
)
from tests.support import grpc_credentials, server_command

if TYPE_CHECKING:
    from tests.conftest import TestPKI

# The server may use at most this much memory: a loader reading /dev/zero fails fast instead
# of taking the host down.
MEMORY_CAP = ["prlimit", f"--as={4 * 1024**3}"]


def finished(job_id: str) -> JobRecord:
    now = utc_now()
    return JobRecord(
        id=job_id,
        command="echo",
        args=("hi",),
        limits=Limits(cpu_percent=100, memory_mb=64, io_bps=0, pids_max=64),
        status=JobStatus.COMPLETED,
        start_time=now,
        end_time=now,
        exit_code=0,
        reason="exited with status 0",
        output_bytes=3,
    )


def write_job(store: JobStore, record: JobRecord, output: bytes | None = b"hi\n") -> Path:
    store.prepare(record.id)
    store.save(record)
    if output is not None:
        store.output_path(record.id).write_bytes(output)
    return store.job_dir(record.id) / "job.json"


def _symlink_to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _other_owner(path: Path) -> None:
    os.chown(path, 12345, 12345)


def _oversized(path: Path) -> None:
    # Still a valid record: only its size gives it away.
    data = path.read_bytes()
    path.write_bytes(data[:-1] + b" " * (MAX_RECORD_BYTES + 1 - len(data)) + data[-1:])


def _deeply_nested(path: Path) -> None:
    # Far below the size cap: the JSON decoder gives up with RecursionError.
    path.write_bytes(b"[" * 200_000)


def _number_too_large_for_a_float(path: Path) -> None:
    # Valid JSON and a valid integer: only its conversion to a float fails (OverflowError).
    record = json.loads(path.read_bytes())
    record["usage"]["cpu_time_s"] = 10**400
    path.write_text(json.dumps(record))


def _changed(**fields: object) -> Callable[[Path], None]:
    """Rewrite the record with ``fields`` changed: valid JSON the server could not serve (a
    GetJobs holding it would fail for everyone)."""

    def change(path: Path) -> None:
        record = json.loads(path.read_bytes())
        record.update(fields)
        path.write_text(json.dumps(record))

    return change


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink to /dev/zero": (_symlink_to_dev_zero, "a symbolic link"),
    "fifo": (_fifo, "not a regular file"),
    "directory": (_directory, "not a regular file"),
    "another owner": (_other_owner, "owned by uid 12345"),
    "oversized": (_oversized, "more than a record can be"),
    "deeply nested": (_deeply_nested, "maximum recursion depth exceeded"),
    "number too large": (_number_too_large_for_a_float, "too large to convert to float"),
    "exit code beyond int32": (_changed(exit_code=2**40), "does not fit a 32-bit field"),
    "lone surrogate": (_changed(command="\ud800"), "surrogates not allowed"),
    "date beyond UTC": (_changed(end_time="9999-12-31T23:59:59-01:00"), "date value out of range"),
}


def stub_for(
    test_pki: TestPKI, address: str
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_record_that_is_not_a_small_file_of_ours_is_skipped_with_one_warning(
    test_pki: TestPKI, tmp_path: Path, kind: str
) -> None:
    store = JobStore(tmp_path / "data")
    write_job(store, finished("1"))
    hostile = write_job(store, finished("2"))
    make, why = HOSTILE[kind]
    make(hostile)
    with start_server(test_pki, tmp_path, wrapper=MEMORY_CAP) as srv:
        channel, stub = stub_for(test_pki, srv.address)
        with channel:
            assert [job.id for job in stub.GetJobs(worker_pb2.EmptyRequest()).jobs] == ["1"]
            assert stub.CreateJob(worker_pb2.CreateJobReq(command="true")).id == "3"
    warnings = [line for line in srv.log_text().splitlines() if str(hostile) in line]
    assert len(warnings) == 1, srv.log_text()
    assert " WARNING " in warnings[0]
    assert why in warnings[0]


def _stream_status(
    test_pki: TestPKI, address: str, how: str, capfd: pytest.CaptureFixture[str]
) -> tuple[object, str]:
    """How a stream of job 1 ends: (status code, message) through grpcio (``follow``,
    ``noFollow``), or (exit status, stderr) of ``jobworker stream --follow=false 1``."""
    if how == "cli --follow=false":
        capfd.readouterr()
        code = cli_main(
            [
                *("--server", address, "--cert", str(test_pki.cert("admin-client"))),
                *("--key", str(test_pki.key("admin-client")), "--ca", str(test_pki.ca_cert)),
                *("stream", "--follow=false", "1"),
            ]
        )
        return code, capfd.readouterr().err
    channel, stub = stub_for(test_pki, address)
    request = worker_pb2.GetJobsStreamReq(id="1", noFollow=how == "noFollow")
    with channel, pytest.raises(grpc.RpcError) as lost:
        list(stub.GetJobsStream(request, timeout=10))
    return lost.value.code(), lost.value.details()


@pytest.mark.parametrize("how", ["follow", "noFollow", "cli --follow=false"])
def test_a_missing_output_log_is_reported_and_its_stream_ends_with_data_loss(
    test_pki: TestPKI, tmp_path: Path, capfd: pytest.CaptureFixture[str], how: str
) -> None:
    store = JobStore(tmp_path / "data")
    write_job(store, finished("1"), output=None)
    with start_server(test_pki, tmp_path) as srv:
        channel, stub = stub_for(test_pki, srv.address)
        with channel:
            assert stub.GetJob(worker_pb2.GetJobReq(id="1")).status == "COMPLETED"
        ending = _stream_status(test_pki, srv.address, how, capfd)
    if how == "cli --follow=false":
        assert ending == (1, "Error: output of job 1 is missing\n")
    else:
        assert ending == (grpc.StatusCode.DATA_LOSS, "output of job 1 is missing")
    warnings = [line for line in srv.log_text().splitlines() if "output.log" in line]
    assert len(warnings) == 1, srv.log_text()
    assert " WARNING " in warnings[0]
    assert "missing" in warnings[0]


def test_jobs_being_a_regular_file_is_one_line_and_exit_2(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs").write_text("not a directory")
    result = subprocess.run(
        server_command(test_pki.dir, data),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == f"jobworker-server: {data / 'jobs'} is not a directory"
    assert "Traceback" not in result.stderr
    assert "CRITICAL" not in result.stderr


def test_sigterm_during_a_long_load_exits_at_once_and_cleanly(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    # Records left RUNNING: each is marked LOST and saved durably at load, which makes the
    # load take far longer than the shutdown is allowed to.
    store = JobStore(tmp_path / "data")
    running = replace(finished("1"), status=JobStatus.RUNNING, end_time=None, exit_code=None)
    for number in range(1, 3001):
        job_id = str(number)
        store.prepare(job_id)
        store.save(replace(running, id=job_id), durable=False)
        store.output_path(job_id).touch()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            server_command(test_pki.dir, tmp_path / "data"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 30
            while "loading job records" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(SHUTDOWN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert code == 0, text
    assert not LISTENING_RE.search(text), "the load was not cut short:\n" + text[-2000:]
    assert "Traceback" not in text
    assert not _cgroup_subtrees(tmp_path / "data")
