"""The server's log never stalls it: stderr into a pipe nobody reads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import descendants, grpc_credentials, pid_alive, server_command

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

    Credentials = Callable[[str], grpc.ChannelCredentials]

RPCS = 5000
CLIENTS = 4
RPC_TIMEOUT_S = 10.0  # generous per call; an event loop blocked in write() answers none
ALL_RPCS_DEADLINE_S = 120.0
SHUTDOWN_TIMEOUT_S = 15.0
DROPPED_RE = re.compile(r"(\d+) log lines dropped")


class PipeReader(threading.Thread):
    """Reads a pipe to its end in the background, once started."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.data = bytearray()

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.data += chunk


def _read_line(fd: int, timeout: float) -> bytes:
    """The first line written to ``fd``, read byte by byte so nothing after it is consumed."""
    deadline = time.monotonic() + timeout
    line = bytearray()
    os.set_blocking(fd, False)
    try:
        while not line.endswith(b"\n"):
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no line from the server: {bytes(line)!r}") from None
                time.sleep(0.01)
                continue
            if not byte:
                raise AssertionError(f"server closed stderr: {bytes(line)!r}")
            line += byte
    finally:
        os.set_blocking(fd, True)
    return bytes(line)


def test_a_log_reader_that_stops_reading_never_stalls_the_server(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        server_command(test_pki.dir, data_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=write_end,
        cwd=tmp_path,
    )
    os.close(write_end)
    reader = PipeReader(read_end)
    try:
        address = ""
        while not address:  # start-up lines, then "listening on HOST:PORT"; then nobody reads
            line = _read_line(read_end, 15).decode()
            if line.startswith("listening on "):
                address = line.split()[-1]
        with grpc.secure_channel(address, grpc_credentials(test_pki, "admin-client")) as channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="sleep", args=["100"]), timeout=RPC_TIMEOUT_S
            )
            [job_pid] = [pid for pid in sorted(descendants(proc.pid)) if _comm(pid) == "sleep"]

            def calls(count: int) -> int:
                for _ in range(count):
                    got = stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=RPC_TIMEOUT_S)
                    assert got.status == "RUNNING"
                return count

            started = time.monotonic()
            with ThreadPoolExecutor(CLIENTS) as pool:
                done = sum(pool.map(calls, [RPCS // CLIENTS] * CLIENTS))
            assert done == RPCS
            assert time.monotonic() - started < ALL_RPCS_DEADLINE_S

        # Shutdown runs to its end with nobody reading: the job is stopped and recorded.
        proc.send_signal(signal.SIGTERM)
        record_path = data_dir / "jobs" / job.id / "job.json"
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while json.loads(record_path.read_text())["status"] == "RUNNING":
            assert time.monotonic() < deadline, "the job was not stopped with the log stuck"
            time.sleep(0.05)
        reader.start()  # only now does anyone read the pipe
        assert proc.wait(SHUTDOWN_TIMEOUT_S) == 0
        reader.join(SHUTDOWN_TIMEOUT_S)
        assert not reader.is_alive()
        assert not pid_alive(job_pid)
        record = json.loads(record_path.read_text())
        assert (record["status"], record["reason"]) == ("STOPPED", "worker shutdown")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if reader.ident is None:
            reader.start()
        reader.join(SHUTDOWN_TIMEOUT_S)
        os.close(read_end)
    text = reader.data.decode(errors="replace")
    dropped = [int(n) for n in DROPPED_RE.findall(text)]
    assert dropped, text[-2000:]
    assert all(n > 0 for n in dropped)
    assert "Traceback" not in text


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


AUDIT_FIELDS = {"time", "level", "event", "job", "identity", "role", "method", "outcome"}


def test_json_log_lines_all_parse_and_an_audit_line_has_every_field(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    with server_factory("--log-format", "json") as srv:
        with grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            job = stub.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
            stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=10)
        with grpc.secure_channel(srv.address, grpc_credentials_for("viewer-client")) as channel:
            viewer = worker_pb2_grpc.JobServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                viewer.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
        srv.stop()
    lines = [json.loads(line) for line in srv.log_text().splitlines()]
    assert all({"time", "level", "event"} <= set(line) for line in lines)
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines
    )
    [listening] = [line for line in lines if line["event"] == "listening"]
    assert listening["message"] == f"listening on {srv.address}"
    audits = [line for line in lines if line["event"] == "rpc"]
    [get] = [a for a in audits if a["method"] == "GetJob"]
    assert AUDIT_FIELDS | {"duration_ms", "peer"} <= set(get)
    assert (get["identity"], get["role"], get["job"], get["outcome"]) == (
        "admin", "admin", job.id, "OK",
    )  # fmt: skip
    assert isinstance(get["duration_ms"], float)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", get["peer"])
    [denied] = [a for a in audits if a["method"] == "StopJob"]
    assert (denied["level"], denied["role"], denied["outcome"]) == (
        "WARNING", "viewer", "PERMISSION_DENIED",
    )  # fmt: skip
    ended = [line for line in lines if line.get("job") == job.id and line["event"] != "rpc"]
    assert ended, "the engine's lines about the job carry its id"


def test_a_start_failure_in_json_format_is_one_json_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*server_command(tmp_path / "nocerts", tmp_path / "data"), "--log-format", "json"],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    failure = json.loads(line)
    assert (failure["level"], failure["event"]) == ("ERROR", "start_failed")
    assert failure["message"].startswith("jobworker-server: cannot read ")
