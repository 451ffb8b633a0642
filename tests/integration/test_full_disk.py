"""A full data disk (a real 20 MiB tmpfs): output loss is counted, marked and visible, the
log's length always matches its file, creates are refused before an id is used, and records
a full disk refused are written once there is room again."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.engine.model import JobRecord, JobStatus, Limits, utc_now
from jobworker.engine.store import JobStore
from tests.integration.conftest import ServerProc, start_server
from tests.support import fill, fill_completely, grpc_credentials, mounted_tmpfs

if TYPE_CHECKING:
    from tests.conftest import TestPKI

TMPFS_BYTES = 20 * 1024 * 1024
FLOOR = str(4 * 1024 * 1024)  # --min-free-disk for these tests: the default exceeds 20 MiB
MARKER = re.compile(rb"\n\[jobworker: (\d+) bytes of output lost: data disk full\]\n")
DEADLINE_S = 20.0


@pytest.fixture
def tmpfs_data(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/data`` as a 20 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "data") as data:
        yield data


def stub_for(
    test_pki: TestPKI, srv: ServerProc
) -> tuple[grpc.Channel, worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
    return channel, worker_pb2_grpc.JobServiceStub(channel)


def wait_for(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ended(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> worker_pb2.GetJobRes:
    reply: list[worker_pb2.GetJobRes] = []

    def done() -> bool:
        reply[:] = [stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5)]
        return reply[0].status not in ("INITIALIZING", "RUNNING")

    wait_for(done, f"job {job_id} to end")
    return reply[0]


def streamed(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> bytes:
    chunks = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=30)
    return b"".join(chunk.payload for chunk in chunks)


def stored(data: Path, job_id: str) -> dict[str, object]:
    record: dict[str, object] = json.loads((data / "jobs" / job_id / "job.json").read_bytes())
    return record


def temp_files(data: Path) -> list[Path]:
    return sorted(data.glob("jobs/*/.job.json*.tmp"))


def test_a_job_writing_more_than_the_disk_holds_ends_with_a_marker(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path
) -> None:
    total = 30 * 1024 * 1024
    script = f"import os\nfor _ in range({total // 65536}): os.write(1, b'x' * 65536)\n"
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            job = stub.CreateJob(worker_pb2.CreateJobReq(command="python3", args=["-c", script]))
            final = ended(stub, job.id)
            assert final.status == "COMPLETED"
            output = streamed(stub, job.id)
        on_disk = (tmpfs_data / "jobs" / job.id / "output.log").read_bytes()
        assert output == on_disk  # what readers are told is exactly what the file holds
        marker = MARKER.search(output)
        assert marker is not None, output[-200:]
        assert output.endswith(marker.group(0))  # the loss ran to the end of the job
        kept = len(output) - len(marker.group(0))
        assert output[:kept] == b"x" * kept
        assert int(marker.group(1)) == total - kept
        record = stored(tmpfs_data, job.id)
        assert record["status"] == "COMPLETED"
        assert record["output_bytes"] == len(on_disk)
        assert record["reason"] == (
            f"exited with status 0; {total - kept} bytes of output lost: data disk full"
        )
        assert not temp_files(tmpfs_data)
    assert srv.log_text().count("output lost: cannot write") == 1


# The gate is in the job's own work dir (its cwd): the one host path a job sees.
LINES_UNTIL_DONE = (
    "i=0; while [ ! -e done ]; do echo line $i; i=$((i+1)); sleep 0.01; done; echo end"
)


def test_output_is_kept_again_once_space_returns_and_the_gap_is_marked(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path
) -> None:
    log_path = tmpfs_data / "jobs" / "1" / "output.log"
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            stub.CreateJob(worker_pb2.CreateJobReq(command="sh", args=["-c", LINES_UNTIL_DONE]))
            wait_for(lambda: b"line 5\n" in log_path.read_bytes(), "the first lines")
            fill(tmpfs_data / "filler")
            srv.wait_for_log("job 1: output lost: cannot write")
            (tmpfs_data / "filler").unlink()
            wait_for(lambda: MARKER.search(log_path.read_bytes()), "the marker")
            wait_for(lambda: log_path.read_bytes().endswith(b"\n"), "a line after the gap")
            (tmpfs_data / "jobs" / "1" / "work" / "done").touch()
            final = ended(stub, "1")
            assert final.status == "COMPLETED"
            output = streamed(stub, "1")
    assert output == log_path.read_bytes()
    markers = list(MARKER.finditer(output))
    assert len(markers) == 1
    marker = markers[0]
    lost = int(marker.group(1))
    assert lost > 0
    before, after = output[: marker.start()], output[marker.end() :]
    assert after.endswith(b"end\n")
    last = int(re.findall(rb"line (\d+)\n", after)[-1])
    expected = b"".join(b"line %d\n" % i for i in range(last + 1)) + b"end\n"
    # Exactly one contiguous run of `lost` bytes is missing, where the marker stands.
    assert expected == before + expected[len(before) : len(before) + lost] + after
    record = stored(tmpfs_data, "1")
    assert record["reason"] == f"exited with status 0; {lost} bytes of output lost: data disk full"


def test_create_while_the_disk_is_full_is_refused_without_using_an_id(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path
) -> None:
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            fill(tmpfs_data / "filler")
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateJob(worker_pb2.CreateJobReq(command="true"))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "data disk full"
            assert list(stub.GetJobs(worker_pb2.EmptyRequest()).jobs) == []
            assert not list((tmpfs_data / "jobs").iterdir())
            (tmpfs_data / "filler").unlink()
            assert stub.CreateJob(worker_pb2.CreateJobReq(command="true")).id == "1"
            assert ended(stub, "1").status == "COMPLETED"


def test_the_default_floor_is_at_least_64_mib(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path
) -> None:
    # 20 MiB free is below max(1 %, 64 MiB): refused, though the disk is empty.
    with start_server(test_pki, tmp_path) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateJob(worker_pb2.CreateJobReq(command="true"))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "data disk full"


@pytest.mark.parametrize("how", ["periodic retry", "shutdown"])
def test_a_final_record_the_full_disk_refused_is_written_once_there_is_room(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path, how: str
) -> None:
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            stub.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["1000"]))
            wait_for(lambda: stored(tmpfs_data, "1")["status"] == "RUNNING", "RUNNING record")
            fillers = fill_completely(tmpfs_data)
            assert stub.StopJob(worker_pb2.StopJobReq(id="1")).status == "STOPPED"
            srv.wait_for_log("job 1: cannot save its record")
            assert stored(tmpfs_data, "1")["status"] == "RUNNING"  # refused by the disk
            assert not temp_files(tmpfs_data)
            for filler in fillers:
                filler.unlink()
            if how == "periodic retry":
                wait_for(lambda: stored(tmpfs_data, "1")["status"] == "STOPPED", "the retry")
        srv.stop()
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as again:
        channel, stub = stub_for(test_pki, again)
        with channel:
            job = stub.GetJob(worker_pb2.GetJobReq(id="1"))
            assert job.status == "STOPPED"  # not LOST: the final record reached the disk


def test_a_lost_record_the_full_disk_refused_at_start_is_written_once_there_is_room(
    test_pki: TestPKI, tmp_path: Path, tmpfs_data: Path
) -> None:
    # A job recorded RUNNING by a server that died: the next start marks it LOST, on a disk
    # too full to take that record.
    store = JobStore(tmpfs_data)
    store.prepare("1")
    running = JobRecord(
        id="1",
        command="sleep",
        args=("1000",),
        limits=Limits(cpu_percent=100, memory_mb=64, io_bps=0, pids_max=64),
        status=JobStatus.RUNNING,
        start_time=utc_now(),
    )
    store.save(running, durable=False)
    store.output_path("1").touch()
    fillers = fill_completely(tmpfs_data)
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as srv:
        channel, stub = stub_for(test_pki, srv)
        with channel:
            assert stub.GetJob(worker_pb2.GetJobReq(id="1")).status == "LOST"
            assert stored(tmpfs_data, "1")["status"] == "RUNNING"  # refused by the disk
            for filler in fillers:
                filler.unlink()
            wait_for(lambda: stored(tmpfs_data, "1")["status"] == "LOST", "the retry")
    refused = [line for line in srv.log_text().splitlines() if "LOST record" in line]
    assert len(refused) == 1, srv.log_text()
    assert " WARNING " in refused[0]
    assert "Traceback" not in srv.log_text()
    assert not temp_files(tmpfs_data)
    with start_server(test_pki, tmp_path, "--min-free-disk", FLOOR) as again:
        channel, stub = stub_for(test_pki, again)
        with channel:
            assert stub.GetJob(worker_pb2.GetJobReq(id="1")).status == "LOST"
    assert "marked LOST" not in again.log_text()  # the record already said so


def test_min_free_disk_is_in_the_help_and_a_negative_value_is_refused(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "jobworker.server", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    shown = run("--help")
    assert shown.returncode == 0, shown.stderr
    assert "--min-free-disk BYTES" in shown.stdout
    refused = run("--min-free-disk", "-1", "--data-dir", str(tmp_path))
    assert refused.returncode == 2
    assert "argument --min-free-disk: must be >= 0: '-1'" in refused.stderr
