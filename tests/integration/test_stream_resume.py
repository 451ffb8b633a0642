"""`jobworker stream` whose connection drops: it reconnects and resumes at the byte it had
reached, byte-exact, with a notice on stderr; `--no-retry` fails at once instead."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2_grpc
from jobworker.cli import main
from tests.support import JOB_PYTHON, CutFirstProxy, cli_flags, grpc_credentials, job_request
from tests.support import wait_job_ended as ended

if TYPE_CHECKING:
    from tests.integration.conftest import ServerProc
    from tests.support import TestPKI

# 8 MiB that never repeat within 64 KiB (so an offset off by any amount shows).
WRITER = (
    "import hashlib, sys\n"
    "out = sys.stdout.buffer\n"
    "for n in range(128):\n"
    "    block = b''.join(hashlib.sha256(b'%d.%d' % (n, i)).digest() for i in range(2048))\n"
    "    out.write(block)\n"
)
SIZE = 128 * 2048 * 32


def cli_args(test_pki: TestPKI, address: str) -> list[str]:
    return cli_flags(test_pki, address)


def finished_writer(test_pki: TestPKI, server: ServerProc) -> str:
    with grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client")) as ch:
        stub = worker_pb2_grpc.JobServiceStub(ch)
        job = stub.CreateJob(job_request(JOB_PYTHON, ["-c", WRITER]), timeout=10)
        assert ended(stub, job.id).status == "COMPLETED"
    return str(job.id)


def cut_after(chunks: int) -> Callable[[], bool]:
    """A cut_when() for CutFirstProxy: true from the server's ``chunks``-th read on."""
    seen = 0

    def due() -> bool:
        nonlocal seen
        seen += 1
        return seen > chunks

    return due


def test_a_dropped_stream_resumes_where_it_was_byte_exact(
    test_pki: TestPKI, server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    job_id = finished_writer(test_pki, server)
    stored = (server.data_dir / "jobs" / job_id / "output.log").read_bytes()
    assert len(stored) == SIZE
    proxy = CutFirstProxy((server.host, server.port), cut_after(20))
    try:
        capfdbinary.readouterr()
        code = main([*cli_args(test_pki, proxy.address), "stream", job_id])
    finally:
        proxy.close()
    captured = capfdbinary.readouterr()
    assert proxy.cut.is_set()
    assert proxy.accepted == 2
    assert code == 0, captured.err
    assert hashlib.sha256(captured.out).hexdigest() == hashlib.sha256(stored).hexdigest()
    notices = [line for line in captured.err.decode().splitlines() if "reconnecting" in line]
    assert len(notices) == 1, captured.err
    assert notices[0].startswith("Connection lost at byte ")
    resumed_at = int(notices[0].split("at byte ")[1].split(":")[0])
    assert 0 < resumed_at < SIZE


def test_no_retry_fails_when_the_connection_drops(
    test_pki: TestPKI, server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    job_id = finished_writer(test_pki, server)
    proxy = CutFirstProxy((server.host, server.port), cut_after(20))
    try:
        capfdbinary.readouterr()
        code = main([*cli_args(test_pki, proxy.address), "stream", "--no-retry", job_id])
    finally:
        proxy.close()
    captured = capfdbinary.readouterr()
    assert proxy.accepted == 1
    assert code == 3
    assert captured.err.decode().splitlines()[-1].startswith("Error: connection lost")
    assert 0 < len(captured.out) < SIZE
