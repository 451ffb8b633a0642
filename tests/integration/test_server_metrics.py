"""Prometheus metrics of a real server, scraped over HTTP and parsed with prometheus_client's
own parser: values move with what clients do."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import grpc_credentials, server_command, skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

METRICS_RE = re.compile(r"metrics on (\S+)")
TIMEOUT = 10
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_address(srv: ServerProc) -> str:
    match = METRICS_RE.search(srv.log_text())
    assert match, srv.log_text()
    return match.group(1)


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(address: str, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``check`` holds (an RPC is counted just after its client has its answer)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = scrape(address)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def rpc_count(
    samples: Samples, method: str, code: str, service: str = "job_worker.JobService"
) -> float | None:
    return value(samples, "jobworker_rpcs_total", service=service, method=method, code=code)


@pytest.fixture
def metered(server_factory: ServerFactory) -> Iterator[ServerProc]:
    with server_factory("--metrics-listen", "127.0.0.1:0") as srv:
        yield srv


@pytest.fixture
def admin(metered: ServerProc, test_pki: TestPKI) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    with grpc.secure_channel(metered.address, grpc_credentials(test_pki, "admin-client")) as ch:
        yield worker_pb2_grpc.JobServiceStub(ch)


def test_metrics_are_off_by_default(server: ServerProc) -> None:
    assert "metrics on" not in server.log_text()


def test_a_job_an_rpc_and_a_stream_are_counted(
    metered: ServerProc, admin: worker_pb2_grpc.JobServiceStub, test_pki: TestPKI
) -> None:
    address = metrics_address(metered)
    before = scrape(address)
    assert value(before, "jobworker_jobs_created_total") == 0
    assert value(before, "jobworker_jobs", status="COMPLETED") == 0
    # The isolation the server logged at start is the one it reports.
    logged = re.search(r"job isolation: ([^;]+);", metered.log_text())
    assert logged is not None
    isolation = logged.group(1).replace(", ", ",")
    info = value(
        before, "jobworker_info", version="0.1.0", cgroups=_cgroups(before), isolation=isolation
    )
    assert info == 1

    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "echo hello"]), timeout=TIMEOUT
    )
    output = b"".join(
        c.payload
        for c in admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=TIMEOUT)
    )
    assert output == b"hello\n"
    with grpc.secure_channel(metered.address, grpc_credentials(test_pki, "viewer-client")) as ch:
        with pytest.raises(grpc.RpcError):
            worker_pb2_grpc.JobServiceStub(ch).CreateJob(
                worker_pb2.CreateJobReq(command="true"), timeout=TIMEOUT
            )
        with pytest.raises(grpc.RpcError):
            ch.unary_unary("/job_worker.JobService/NoSuch")(b"", timeout=TIMEOUT)

    after = scrape_until(
        address,
        lambda s: (
            rpc_count(s, "GetJobsStream", "OK") == 1
            and value(s, "jobworker_rpcs_total", service="?", method="?", code="UNIMPLEMENTED") == 1
        ),
    )
    assert value(after, "jobworker_jobs_created_total") == 1
    assert value(after, "jobworker_jobs", status="COMPLETED") == 1
    assert value(after, "jobworker_jobs_ended_total", status="COMPLETED", reason_kind="exited") == 1
    assert value(after, "jobworker_job_start_seconds_count") == 1
    assert rpc_count(after, "CreateJob", "OK") == 1
    assert rpc_count(after, "CreateJob", "PERMISSION_DENIED") == 1
    assert rpc_count(after, "GetJobsStream", "OK") == 1
    assert (
        value(
            after,
            "jobworker_rpc_duration_seconds_count",
            service="job_worker.JobService",
            method="CreateJob",
        )
        == 2
    )
    # an unknown method is counted, but its client-chosen name is not a label
    assert not any("NoSuch" in str(labels) for _, labels in after)
    assert value(after, "jobworker_stream_bytes_total") == len(output)
    assert value(after, "jobworker_output_bytes_total") == len(output)
    assert value(after, "jobworker_streams_active") == 0
    assert value(after, "jobworker_stream_catch_ups_total") == 0
    assert (value(after, "jobworker_connections_active") or 0) >= 1


def _cgroups(samples: Samples) -> str:
    for (name, labels), _ in samples.items():
        if name == "jobworker_info":
            return dict(labels)["cgroups"]
    raise AssertionError("no jobworker_info")


def test_a_running_job_reports_its_cgroup_usage_and_then_its_stop(
    metered: ServerProc, admin: worker_pb2_grpc.JobServiceStub
) -> None:
    address = metrics_address(metered)
    skip_unless(_cgroups(scrape(address)) != "none", "needs root and a usable cgroup hierarchy")
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "i=0; while :; do i=$((i+1)); done"]),
        timeout=TIMEOUT,
    )
    running = scrape_until(
        address, lambda s: (value(s, "jobworker_job_cpu_seconds_total", job=job.id) or 0) > 0
    )
    assert value(running, "jobworker_jobs", status="RUNNING") == 1
    assert (value(running, "jobworker_job_cpu_seconds_total", job=job.id) or 0) > 0
    assert (value(running, "jobworker_job_memory_bytes", job=job.id) or 0) > 0
    admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=TIMEOUT)
    stopped = scrape(address)
    assert (
        value(stopped, "jobworker_jobs_ended_total", status="STOPPED", reason_kind="stopped") == 1
    )
    assert value(stopped, "jobworker_job_cpu_seconds_total", job=job.id) is None
    assert value(stopped, "jobworker_jobs", status="RUNNING") == 0


def test_failed_handshakes_are_counted_by_kind(metered: ServerProc, test_pki: TestPKI) -> None:
    address = metrics_address(metered)
    credentials = grpc_credentials(test_pki, "foreign-client")
    with (
        grpc.secure_channel(metered.address, credentials) as ch,
        pytest.raises(grpc.RpcError),
    ):
        worker_pb2_grpc.JobServiceStub(ch).GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT)
    samples = scrape_until(
        address,
        lambda s: (
            value(s, "jobworker_handshake_failures_total", reason="bad_certificate") is not None
        ),
    )
    assert (
        value(samples, "jobworker_handshake_failures_total", reason="bad_certificate") or 0
    ) >= 1


def test_jobs_found_lost_count_once(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    data = str(tmp_path / "shared-data")
    with server_factory("--data-dir", data, expect_exit=None) as first:
        with grpc.secure_channel(first.address, grpc_credentials(test_pki, "admin-client")) as ch:
            worker_pb2_grpc.JobServiceStub(ch).CreateJob(
                worker_pb2.CreateJobReq(command="sleep", args=["60"]), timeout=TIMEOUT
            )
        first.process.kill()  # a crash: the job's end is never seen
        first.process.wait(TIMEOUT)
    with server_factory("--data-dir", data, "--metrics-listen", "127.0.0.1:0") as second:
        samples = scrape(metrics_address(second))
        assert value(samples, "jobworker_jobs_ended_total", status="LOST", reason_kind="lost") == 1
        assert value(samples, "jobworker_jobs", status="LOST") == 1
        assert value(samples, "jobworker_jobs_created_total") == 0
    with server_factory("--data-dir", data, "--metrics-listen", "127.0.0.1:0") as third:
        samples = scrape(metrics_address(third))
        assert value(samples, "jobworker_jobs_ended_total", status="LOST", reason_kind="lost") == 0
        assert value(samples, "jobworker_jobs", status="LOST") == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"\x16\x03\x01 garbage\r\n\r\n", 400),
    ],
)
def test_the_metrics_endpoint_refuses_what_is_not_a_scrape(
    metered: ServerProc, request_bytes: bytes, status: int
) -> None:
    host, _, port = metrics_address(metered).rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:100]
    # the gRPC side is untouched
    scrape(metrics_address(metered))


def test_a_metrics_address_in_use_is_one_line_and_exit_2(
    metered: ServerProc, server_factory: ServerFactory
) -> None:
    taken = metrics_address(metered)
    other_data = metered.data_dir.parent / "other-data"
    proc = subprocess.run(
        server_command(metered.certs_dir, other_data, "--metrics-listen", taken),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert f"jobworker-server: cannot listen for metrics on {taken}: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_urllib_sees_404_elsewhere(metered: ServerProc) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{metrics_address(metered)}/", timeout=TIMEOUT)
    assert info.value.code == 404


def test_a_reader_that_falls_behind_is_counted_as_a_catch_up(
    metered: ServerProc, admin: worker_pb2_grpc.JobServiceStub
) -> None:
    size = 64 * 1024 * 1024  # far more than HTTP/2 windows and the reader's live buffer
    # The job waits for a file before its burst: by then the reader has caught up with
    # "ready" and joined the live path, so the burst has to overtake it there.
    script = f"echo ready; while [ ! -e go ]; do sleep 0.01; done; exec head -c {size} /dev/zero"
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", script]), timeout=TIMEOUT
    )
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=60)
    first = next(stream).payload
    assert first == b"ready\n"
    (metered.data_dir / "jobs" / job.id / "work" / "go").touch()
    # Stop reading until the job has ended: the pump runs ahead of this reader.
    deadline = time.monotonic() + 60
    while admin.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT).status == "RUNNING":
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)
    received = len(first) + sum(len(chunk.payload) for chunk in stream)
    assert received == len(first) + size
    samples = scrape_until(
        metrics_address(metered), lambda s: value(s, "jobworker_streams_active") == 0
    )
    assert (value(samples, "jobworker_stream_catch_ups_total") or 0) >= 1
    assert value(samples, "jobworker_stream_bytes_total") == received
    assert value(samples, "jobworker_output_bytes_total") == received


def test_streams_active_counts_an_open_stream_until_it_ends(
    metered: ServerProc, admin: worker_pb2_grpc.JobServiceStub
) -> None:
    address = metrics_address(metered)
    assert value(scrape(address), "jobworker_streams_active") == 0
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "echo ready; exec sleep 60"]),
        timeout=TIMEOUT,
    )
    stream = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=60)
    try:
        assert next(stream).payload == b"ready\n"  # the reader is open on the server
        assert value(scrape(address), "jobworker_streams_active") == 1
    finally:
        stream.cancel()
    closed = scrape_until(address, lambda s: value(s, "jobworker_streams_active") == 0)
    assert value(closed, "jobworker_streams_active") == 0
    # A stream that ends by itself (the job's end) is released too.
    ended = admin.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=60)
    assert next(ended).payload == b"ready\n"
    assert value(scrape(address), "jobworker_streams_active") == 1
    admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=TIMEOUT)
    assert list(ended) == []  # nothing more: the job ended, the stream with it
    done = scrape_until(address, lambda s: value(s, "jobworker_streams_active") == 0)
    assert value(done, "jobworker_streams_active") == 0
