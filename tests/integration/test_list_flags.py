"""`jobworker list --status/--owner/--limit/--newest-first` and ListJobs paging, against a real
server holding 10,000 finished records (cloned on disk before it starts, as scripts/bench.py
does) and one holding jobs with 1 MiB of arguments each; and the GetJobs fallback, filtered
the same way, against a scripted server without ListJobs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from jobworker.cli.args import UsageError, parse
from jobworker.engine import JobRecord, JobStatus, Limits
from jobworker.engine.store import JobStore, record_to_json
from jobworker.wire.contract import DEFAULT_MAX_MESSAGE_BYTES
from tests.integration.conftest import start_server
from tests.integration.test_client_transport import (
    FakeConnection,
    ServerCall,
    client_for,
    fake_server,
)
from tests.support import cli_flags, grpc_credentials, wait_job_ended

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

RECORDS = 10_000
STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)
OWNERS = ("alice", "bob")
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BIG_ARGS = ["a" * 65536] * 16  # 1 MiB of arguments
BIG_JOBS = 5  # five together exceed a 4 MiB page


def status_of(number: int) -> JobStatus:
    return STATUSES[number % len(STATUSES)]


def owner_of(number: int) -> str:
    return OWNERS[number % len(OWNERS)]


def clone_records(data_dir: Path, count: int) -> None:
    """``count`` finished records (ids 1..count) on disk, an empty output each: the first
    through the engine's store, the others copies of its JSON with their own id, status and
    owner (thousands a second)."""
    store = JobStore(data_dir)
    template = record_to_json(
        JobRecord(
            id="1",
            command="/bin/echo",
            args=("record",),
            limits=Limits(cpu_percent=100, memory_mb=512, io_bps=0, pids_max=1024),
            status=JobStatus.COMPLETED,
            start_time=START,
            end_time=START,
            exit_code=0,
        )
    )
    for number in range(1, count + 1):
        store.prepare(str(number))
        template.update(id=str(number), status=status_of(number).value, owner=owner_of(number))
        (store.job_dir(str(number)) / "job.json").write_text(json.dumps(template))
        store.output_path(str(number)).touch()


@pytest.fixture(scope="module")
def many_server(
    test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("ten-thousand")
    clone_records(tmp / "data", RECORDS)
    with start_server(test_pki, tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def big_server(test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server holding BIG_JOBS finished jobs (real processes) of 1 MiB of arguments each."""
    with start_server(test_pki, tmp_path_factory.mktemp("big-args")) as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
        with channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            for _ in range(BIG_JOBS):
                request = worker_pb2.CreateJobReq(command="/bin/true", args=BIG_ARGS)
                wait_job_ended(stub, stub.CreateJob(request, timeout=10).id)
        yield srv


def pages(server: ServerProc, test_pki: TestPKI, **request: Any) -> list[worker_pb2.ListJobsRes]:
    """Every page of ListJobs through grpcio (accepting more than the server may send, so that
    a page over the limit would arrive and fail the size check)."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    credentials = grpc_credentials(test_pki, "viewer-client")
    got: list[worker_pb2.ListJobsRes] = []
    with grpc.secure_channel(server.address, credentials, options=options) as channel:
        stub = worker_pb2_grpc.JobServiceStub(channel)
        token = ""
        while True:
            page = stub.ListJobs(worker_pb2.ListJobsReq(pageToken=token, **request), timeout=30)
            assert page.ByteSize() <= DEFAULT_MAX_MESSAGE_BYTES
            got.append(page)
            token = page.nextPageToken
            if not token:
                return got
            assert len(got) < RECORDS, "ListJobs never returned a last page"


def ids_of(got: list[worker_pb2.ListJobsRes]) -> list[str]:
    return [job.id for page in got for job in page.jobs]


def cli_list(
    test_pki: TestPKI, server: ServerProc, capfd: pytest.CaptureFixture[bytes], *flags: str
) -> tuple[int, list[str], str]:
    """(exit status, stdout lines, stderr) of `jobworker list FLAGS` as the viewer."""
    capfd.readouterr()
    code = main(
        [
            *cli_flags(test_pki, server.address, "viewer-client"),
            *("--timeout", "30", "list", *flags),
        ]
    )
    out, err = capfd.readouterr()
    return code, out.decode().splitlines(), err.decode()


def spec_line(number: int) -> str:
    return (
        f"{number} {status_of(number).value} StartTime: 2026-01-01T00:00:00Z"
        " Command: /bin/echo record"
    )


def test_list_jobs_pages_through_ten_thousand_records(
    many_server: ServerProc, test_pki: TestPKI
) -> None:
    everything = [str(n) for n in range(1, RECORDS + 1)]
    default = pages(many_server, test_pki)
    assert len(default) == RECORDS // 1000  # the default page: 1000 jobs
    assert ids_of(default) == everything
    assert ids_of(pages(many_server, test_pki, pageSize=10_000)) == everything
    assert ids_of(pages(many_server, test_pki, pageSize=777, newestFirst=True)) == everything[::-1]
    alice_failed = [
        str(n)
        for n in range(1, RECORDS + 1)
        if owner_of(n) == "alice" and status_of(n) is JobStatus.FAILED
    ]
    filtered = pages(many_server, test_pki, status=["FAILED"], owner="alice", pageSize=500)
    assert ids_of(filtered) == alice_failed
    assert all(job.owner == "alice" and job.status == "FAILED" for p in filtered for job in p.jobs)


def test_jobworker_list_prints_all_ten_thousand_in_the_spec_format(
    many_server: ServerProc, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, lines, err = cli_list(test_pki, many_server, capfdbinary)
    assert (code, err) == (0, "")
    assert lines == [spec_line(n) for n in range(1, RECORDS + 1)]


def test_jobworker_list_filters_by_status_owner_and_stops_at_the_limit(
    many_server: ServerProc, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    numbers = range(1, RECORDS + 1)
    code, lines, _ = cli_list(test_pki, many_server, capfdbinary, "--limit", "5")
    assert (code, lines) == (0, [spec_line(n) for n in range(1, 6)])

    code, lines, _ = cli_list(
        test_pki, many_server, capfdbinary, "--status", "failed", "--owner", "bob", "--limit", "3"
    )
    wanted = [n for n in numbers if status_of(n) is JobStatus.FAILED and owner_of(n) == "bob"]
    assert (code, lines) == (0, [spec_line(n) for n in wanted[:3]])

    # Comma-separated and repeated statuses add up; no limit: every match, over pages.
    code, lines, _ = cli_list(
        test_pki, many_server, capfdbinary, "--status", "FAILED,stopped", "--status", "LOST"
    )
    assert (code, lines) == (
        0,
        [spec_line(n) for n in numbers if status_of(n) is not JobStatus.COMPLETED],
    )

    code, lines, _ = cli_list(
        test_pki, many_server, capfdbinary, "--owner", "alice", "--newest-first", "--limit", "2"
    )
    assert (code, lines) == (0, [spec_line(RECORDS), spec_line(RECORDS - 2)])

    code, lines, _ = cli_list(test_pki, many_server, capfdbinary, "--owner", "mallory")
    assert (code, lines) == (0, [])


def test_list_flags_are_checked_before_anything_is_sent() -> None:
    command = parse(["list", "--status", "running,Failed", "--status", "LOST", "--limit", "7"])
    assert command.statuses == ("RUNNING", "FAILED", "LOST")
    assert (command.limit, command.owner, command.newest_first) == (7, "", False)
    with pytest.raises(UsageError, match=r"unknown status 'DONE' \(expected one of INITIALIZING,"):
        parse(["list", "--status", "done"])
    with pytest.raises(UsageError, match=r"must be at least 1: 0"):
        parse(["list", "--limit", "0"])


def test_list_jobs_pages_through_jobs_of_one_mebibyte_of_arguments(
    big_server: ServerProc, test_pki: TestPKI, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    got = pages(big_server, test_pki)
    assert len(got) > 1  # five 1 MiB jobs cannot share one 4 MiB page
    jobs = [job for page in got for job in page.jobs]
    assert [job.id for job in jobs] == [str(n) for n in range(1, BIG_JOBS + 1)]
    assert all(list(job.args) == BIG_ARGS for job in jobs)
    assert ids_of(pages(big_server, test_pki, newestFirst=True, pageSize=2)) == [
        "5",
        "4",
        "3",
        "2",
        "1",
    ]
    command = f"Command: /bin/true {' '.join(BIG_ARGS)}"
    code, lines, _ = cli_list(test_pki, big_server, capfdbinary, "--limit", "4")
    assert code == 0
    assert [line.split()[:2] for line in lines] == [[str(n), "COMPLETED"] for n in range(1, 5)]
    assert all(line.endswith(command) for line in lines)
    code, lines, _ = cli_list(test_pki, big_server, capfdbinary, "--status", "COMPLETED")
    assert (code, len(lines)) == (0, BIG_JOBS)


# A server without ListJobs: GetJobs, then the same filters applied by the client.

UNIMPLEMENTED = 12
OLD_JOBS = [
    worker_pb2.Job(id=str(n), command="echo", status=status_of(n).value, owner=owner_of(n))
    for n in range(1, 9)
]


async def server_without_list_jobs(conn: FakeConnection, call: ServerCall) -> None:
    if call.headers[":path"].endswith("/ListJobs"):
        await conn.trailers_only(call, UNIMPLEMENTED, "unknown method")
    else:
        await conn.respond(call, worker_pb2.Jobs(jobs=OLD_JOBS).SerializeToString())


async def test_without_list_jobs_the_client_filters_the_get_jobs_answer(test_pki: TestPKI) -> None:
    async with (
        fake_server(test_pki, server_without_list_jobs) as server,
        client_for(test_pki, server.address) as client,
    ):
        everything = await client.list_all()
        some = await client.list_all(statuses=["failed"], owner="bob", limit=1)
        newest = await client.list_all(newest_first=True, limit=3)
    assert [job.id for job in everything] == [str(n) for n in range(1, 9)]
    assert [job.id for job in some] == ["1"]  # FAILED and bob's: 1 and 7; the limit is 1
    assert [job.id for job in newest] == ["8", "7", "6"]
