"""End to end with a real Prometheus server (Debian's ``prometheus`` package, installed by
.ci/run): it scrapes our /metrics every second and answers a query for our metric."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import grpc_credentials, skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

PROMETHEUS_TIMEOUT_S = 60.0  # its start (TSDB, rule manager) plus a few scrapes
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prometheus(binary: str, target: str, tmp_path: Path) -> Iterator[str]:
    """Run Prometheus scraping ``target`` every second; yield its HTTP address."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: jobworker\n"
        "    scrape_timeout: 1s\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    address = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(address: str, promql: str) -> list[dict[str, Any]]:
    url = f"http://{address}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def wait_for(address: str, promql: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Query until the result is not empty (Prometheus starting, first scrapes)."""
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
    while True:
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            result = query(address, promql)
            if result:
                return result
        if time.monotonic() > deadline:
            log = (tmp_path / "prometheus.log").read_text(errors="replace")
            raise AssertionError(f"no result for {promql} in {PROMETHEUS_TIMEOUT_S}s:\n{log}")
        time.sleep(0.2)


def test_prometheus_scrapes_our_metrics(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    skip_unless(
        binary is not None, "the prometheus binary is not installed (apt-get install prometheus)"
    )
    assert binary is not None
    with server_factory("--metrics-listen", "127.0.0.1:0") as srv:
        target = re.search(r"metrics on (\S+)", srv.log_text())
        assert target, srv.log_text()
        with grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client")) as ch:
            worker_pb2_grpc.JobServiceStub(ch).CreateJob(
                worker_pb2.CreateJobReq(command="true"), timeout=10
            )
        with prometheus(binary, target.group(1), tmp_path) as address:
            up = wait_for(address, 'up{job="jobworker"} == 1', tmp_path)
            assert up[0]["metric"]["instance"] == target.group(1)
            created = wait_for(address, "jobworker_jobs_created_total", tmp_path)
            assert created[0]["value"][1] == "1"
            info = wait_for(address, "jobworker_info", tmp_path)
            assert info[0]["metric"]["version"] == "0.1.0"
