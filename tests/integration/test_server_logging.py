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

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import descendants, grpc_credentials, pid_alive, server_command

if TYPE_CHECKING:
    from tests.conftest import TestPKI

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
