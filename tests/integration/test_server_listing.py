"""Listing many or large jobs: GetJobs refuses what cannot fit one message, ListJobs pages.

Jobs are created through grpcio (real processes) where their content matters, and written
into the data dir through the engine's JobStore before the server starts where only their
number does (thousands of records in well under a second).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from jobworker.engine import JobRecord, JobStatus, Limits
from jobworker.engine.store import JobStore
from jobworker.wire.contract import DEFAULT_MAX_MESSAGE_BYTES
from tests.integration.conftest import start_server
from tests.support import grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

WAIT_S = 10.0
BIG_ARG = "x" * 100_000
BIG_JOBS = 5  # ten 100 KB arguments each: the five together exceed one 4 MiB message
TOO_MANY = "too many jobs to list in one message (5 jobs): use ListJobs"


def wait_ended(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5).status in (
        "INITIALIZING",
        "RUNNING",
    ):
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.02)


def pages(stub: worker_pb2_grpc.JobServiceStub, **request: Any) -> Iterator[worker_pb2.ListJobsRes]:
    """Every page of ListJobs for ``request``, asserting each fits the default limit."""
    token = ""
    for _ in range(100_000):
        page = stub.ListJobs(worker_pb2.ListJobsReq(pageToken=token, **request), timeout=10)
        assert page.ByteSize() <= DEFAULT_MAX_MESSAGE_BYTES
        yield page
        token = page.nextPageToken
        if not token:
            return
    raise AssertionError("ListJobs never returned a last page")


def listed_ids(stub: worker_pb2_grpc.JobServiceStub, **request: object) -> list[str]:
    return [job.id for page in pages(stub, **request) for job in page.jobs]


@pytest.fixture(scope="module")
def big_server(test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server holding five finished jobs of 1 MB of arguments each (ids 1-5)."""
    with start_server(test_pki, tmp_path_factory.mktemp("big-jobs")) as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
        stub = worker_pb2_grpc.JobServiceStub(channel)
        for _ in range(BIG_JOBS):
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="/bin/true", args=[BIG_ARG] * 10), timeout=10
            )
            wait_ended(stub, job.id)
        channel.close()
        yield srv


@pytest.fixture
def stub_for(
    test_pki: TestPKI, big_server: ServerProc
) -> Iterator[Callable[[str], worker_pb2_grpc.JobServiceStub]]:
    channels: list[grpc.Channel] = []

    def make(stem: str) -> worker_pb2_grpc.JobServiceStub:
        # The client accepts more than the server may send, so that a page or a listing
        # that broke the server's limit would arrive here and fail the size assertions.
        channel = grpc.secure_channel(
            big_server.address,
            grpc_credentials(test_pki, stem),
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        channels.append(channel)
        return worker_pb2_grpc.JobServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.mark.parametrize("stem", ["admin-client", "viewer-client"])
def test_get_jobs_too_large_for_one_message_is_resource_exhausted_naming_list_jobs(
    stub_for: Callable[[str], worker_pb2_grpc.JobServiceStub], big_server: ServerProc, stem: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub_for(stem).GetJobs(worker_pb2.EmptyRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == TOO_MANY
    assert "Traceback" not in big_server.log_text()


@pytest.mark.parametrize("stem", ["admin-client", "viewer-client"])
def test_list_jobs_pages_through_large_jobs_each_page_within_the_limit(
    stub_for: Callable[[str], worker_pb2_grpc.JobServiceStub], stem: str
) -> None:
    stub = stub_for(stem)
    got = list(pages(stub))
    assert len(got) > 1  # five 1 MB jobs cannot share one 4 MiB page
    jobs = [job for page in got for job in page.jobs]
    assert [job.id for job in jobs] == ["1", "2", "3", "4", "5"]
    assert all(list(job.args) == [BIG_ARG] * 10 for job in jobs)
    assert all(job.status == "COMPLETED" for job in jobs)
    assert listed_ids(stub, newestFirst=True) == ["5", "4", "3", "2", "1"]


def test_get_jobs_too_large_is_still_refused_after_a_restart(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    """The same five 1 MB jobs, loaded from their records by a new server on the data dir."""
    with server_factory() as first:
        channel = grpc.secure_channel(first.address, grpc_credentials(test_pki, "admin-client"))
        with channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            for _ in range(BIG_JOBS):
                job = stub.CreateJob(
                    worker_pb2.CreateJobReq(command="/bin/true", args=[BIG_ARG] * 10), timeout=10
                )
                wait_ended(stub, job.id)
    with server_factory("--data-dir", str(first.data_dir)) as second:
        for stem in ("admin-client", "viewer-client"):
            # Accepts more than the server may send: a listing sent whole would arrive here.
            channel = grpc.secure_channel(
                second.address,
                grpc_credentials(test_pki, stem),
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            )
            with channel:
                stub = worker_pb2_grpc.JobServiceStub(channel)
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.details() == TOO_MANY
                assert listed_ids(stub) == ["1", "2", "3", "4", "5"]
    assert "5 jobs loaded" in second.log_text()
    assert "Traceback" not in second.log_text()


def cli_list_as_viewer(
    test_pki: TestPKI, server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> list[str]:
    """The lines `jobworker list` prints with the viewer certificate (it must exit 0)."""
    capfdbinary.readouterr()
    code = main(
        [
            *("--server", server.address, "--cert", str(test_pki.cert("viewer-client"))),
            *("--key", str(test_pki.key("viewer-client")), "--ca", str(test_pki.ca_cert)),
            "list",
        ]
    )
    out, err = capfdbinary.readouterr()
    assert code == 0, err
    return out.decode().splitlines()


def test_jobworker_list_prints_every_job_of_a_listing_too_large_for_get_jobs(
    test_pki: TestPKI, big_server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    lines = cli_list_as_viewer(test_pki, big_server, capfdbinary)
    assert [line.split()[:2] for line in lines] == [[str(i), "COMPLETED"] for i in range(1, 6)]
    assert all(line.endswith(f"Command: /bin/true {' '.join([BIG_ARG] * 10)}") for line in lines)


# Thousands of records, written through the engine's store before the server starts.

RECORDS = 3000
STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)


def write_records(data_dir: Path, count: int) -> None:
    store = JobStore(data_dir)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for number in range(1, count + 1):
        record = JobRecord(
            id=str(number),
            command="/bin/echo",
            args=(f"record {number}",),
            limits=Limits(cpu_percent=100, memory_mb=512, io_bps=0, pids_max=1024),
            status=STATUSES[number % len(STATUSES)],
            start_time=start,
            end_time=start,
            exit_code=0,
        )
        store.prepare(str(number))
        store.save(record, durable=False)
        store.output_path(str(number)).touch()


@pytest.fixture(scope="module")
def many_server(
    test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("many-jobs")
    write_records(tmp / "data", RECORDS)
    with start_server(test_pki, tmp) as srv:
        yield srv


@pytest.fixture
def many_stub(
    test_pki: TestPKI, many_server: ServerProc
) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(many_server.address, grpc_credentials(test_pki, "viewer-client"))
    yield worker_pb2_grpc.JobServiceStub(channel)
    channel.close()


def test_list_jobs_pages_through_thousands_of_records_in_id_order(
    many_stub: worker_pb2_grpc.JobServiceStub,
) -> None:
    expected = [str(n) for n in range(1, RECORDS + 1)]
    assert listed_ids(many_stub) == expected  # the server's default page size
    assert listed_ids(many_stub, pageSize=7) == expected
    assert listed_ids(many_stub, pageSize=1000, newestFirst=True) == expected[::-1]
    first = many_stub.ListJobs(worker_pb2.ListJobsReq(pageSize=10), timeout=10)
    assert [job.id for job in first.jobs] == expected[:10]
    assert first.nextPageToken


def test_a_page_token_stays_valid_while_jobs_are_added(
    test_pki: TestPKI, many_server: ServerProc, many_stub: worker_pb2_grpc.JobServiceStub
) -> None:
    first = many_stub.ListJobs(worker_pb2.ListJobsReq(pageSize=RECORDS - 1), timeout=10)
    channel = grpc.secure_channel(many_server.address, grpc_credentials(test_pki, "admin-client"))
    admin = worker_pb2_grpc.JobServiceStub(channel)
    added = admin.CreateJob(worker_pb2.CreateJobReq(command="/bin/true"), timeout=10).id
    wait_ended(admin, added)
    channel.close()
    rest = many_stub.ListJobs(worker_pb2.ListJobsReq(pageToken=first.nextPageToken), timeout=10)
    ids = [job.id for job in first.jobs] + [job.id for job in rest.jobs]
    assert ids[-2:] == [str(RECORDS), added]
    assert len(ids) == len(set(ids)) == int(added)
    assert not rest.nextPageToken


def test_list_jobs_filters_by_status(many_stub: worker_pb2_grpc.JobServiceStub) -> None:
    failed = [str(n) for n in range(1, RECORDS + 1) if STATUSES[n % 3] is JobStatus.FAILED]
    assert listed_ids(many_stub, status=["FAILED"], pageSize=100) == failed
    both = listed_ids(many_stub, status=["failed", "STOPPED"], pageSize=100)
    assert len(both) == len([n for n in range(1, RECORDS + 1) if n % 3 != 0])
    assert listed_ids(many_stub, status=["RUNNING"]) == []


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"pageSize": -1}, "pageSize must not be negative: -1"),
        ({"pageToken": "bogus"}, "invalid page token"),
        (
            {"status": ["DONE"]},
            "unknown status: DONE (expected one of INITIALIZING, RUNNING, "
            "COMPLETED, FAILED, STOPPED, LOST)",
        ),
    ],
)
def test_bad_list_jobs_requests_are_invalid_arguments(
    many_stub: worker_pb2_grpc.JobServiceStub, request_fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        many_stub.ListJobs(worker_pb2.ListJobsReq(**request_fields), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message


def test_a_token_of_one_order_is_refused_in_the_other(
    many_stub: worker_pb2_grpc.JobServiceStub,
) -> None:
    first = many_stub.ListJobs(worker_pb2.ListJobsReq(pageSize=5), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        many_stub.ListJobs(
            worker_pb2.ListJobsReq(pageToken=first.nextPageToken, newestFirst=True), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "invalid page token: it was issued for the other order"


def test_get_jobs_still_answers_a_listing_that_fits(
    many_stub: worker_pb2_grpc.JobServiceStub,
) -> None:
    jobs = many_stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs
    assert [job.id for job in jobs][:RECORDS] == [str(n) for n in range(1, RECORDS + 1)]


def test_jobworker_list_pages_through_thousands_of_records(
    test_pki: TestPKI, many_server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    lines = cli_list_as_viewer(test_pki, many_server, capfdbinary)
    assert [line.split()[0] for line in lines][:RECORDS] == [str(n) for n in range(1, RECORDS + 1)]
    assert lines[41] == (
        f"42 {STATUSES[0].value} StartTime: 2026-01-01T00:00:00Z Command: /bin/echo 'record 42'"
    )


def test_a_job_too_large_for_a_page_of_its_own_is_named_not_internal(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    # Only a server whose message limit is below the arguments limit can hold such a job.
    limit = 100_000
    with server_factory("--max-message-bytes", str(limit)) as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
        stub = worker_pb2_grpc.JobServiceStub(channel)
        small = stub.CreateJob(worker_pb2.CreateJobReq(command="/bin/true"), timeout=10)
        request = worker_pb2.CreateJobReq(command="/bin/true", args=["y" * (limit - 100)])
        big = stub.CreateJob(request, timeout=10)
        first = stub.ListJobs(worker_pb2.ListJobsReq(), timeout=10)
        assert [job.id for job in first.jobs] == [small.id]
        with pytest.raises(grpc.RpcError) as info:
            stub.ListJobs(worker_pb2.ListJobsReq(pageToken=first.nextPageToken), timeout=10)
        channel.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(
        rf"job {big.id} is too large to list \(\d+ bytes, limit {limit - 64}\)",
        info.value.details(),
    )
