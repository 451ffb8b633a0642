"""Client-supplied text in the server's log: quoted, so that it can neither forge a line nor
send terminal escapes to whoever reads the log.

Job arguments come from any admin; certificate names from whoever the CA signed. Both are
sent with newlines that start a fake log line and an ANSI escape, through grpcio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from jobworker import pki
from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import JOB_PYTHON, grpc_credentials

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

FORGED = "2026-01-01T00:00:00.000Z INFO jobworker.engine job 99 created: /bin/forged"
ESCAPE = "\x1b[31m"
EVIL_ARGS = [f"ok\n{FORGED}", f"{ESCAPE}red", "tab\there"]
EVIL_NAME = f"e\n{FORGED[:24]} INFO x{ESCAPE}"  # a CN has at most 64 characters


def assert_clean(log: bytes) -> None:
    """No raw control byte but the line ends, and no line that a client wrote."""
    controls = {byte for byte in log if byte < 0x20 and byte != 0x0A} | ({0x7F} & set(log))
    assert not controls, f"raw control bytes in the log: {sorted(controls)}"
    lines = log.decode().splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:24])]


def test_job_arguments_are_quoted_in_the_created_line(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory() as srv:
        with grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client")) as ch:
            stub = worker_pb2_grpc.JobServiceStub(ch)
            job = stub.CreateJob(
                worker_pb2.CreateJobReq(command="/bin/echo", args=EVIL_ARGS), timeout=10
            )
        srv.wait_for_log(f"job {job.id} created:")
    log = srv.log_path.read_bytes()
    assert_clean(log)
    [created] = [line for line in log.decode().splitlines() if f"job {job.id} created:" in line]
    assert (
        f'job {job.id} created: ["/bin/echo", "ok\\n{FORGED}", "\\u001b[31mred", "tab\\there"] '
        "(cpu 100%, memory 512 MB, io 0 B/s)"
    ) in created


def test_a_long_command_line_is_clipped_in_the_log(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory() as srv:
        with grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client")) as ch:
            stub = worker_pb2_grpc.JobServiceStub(ch)
            args = ["-c", "pass", *(["x" * 100] * 50)]
            job = stub.CreateJob(worker_pb2.CreateJobReq(command=JOB_PYTHON, args=args), timeout=10)
        text = srv.wait_for_log(f"job {job.id} created:")
    [created] = [line for line in text.splitlines() if f"job {job.id} created:" in line]
    assert '"xxxx' in created
    assert created.endswith("... (53 words) (cpu 100%, memory 512 MB, io 0 B/s)")
    assert len(created) < 400


def test_certificate_names_are_quoted_in_connection_lines(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    certs = tmp_path / "evil-certs"
    certs.mkdir()
    pki.write_pair(certs, "evil", test_pki.ca.issue_client(EVIL_NAME, "admin"))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=test_pki.ca_cert.read_bytes(),
        private_key=(certs / "evil-key.pem").read_bytes(),
        certificate_chain=(certs / "evil-cert.pem").read_bytes(),
    )
    with (
        server_factory("--log-level", "DEBUG", "--idle-timeout", "0.5") as srv,
        grpc.secure_channel(srv.address, credentials) as channel,
    ):
        stub = worker_pb2_grpc.JobServiceStub(channel)
        stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10)
        # the idle close logs the name at INFO, the connection's end at DEBUG
        srv.wait_for_log(r"closing idle connection")
        srv.wait_for_log(r"connection from \S+ \(.*\) ended")
    log = srv.log_path.read_bytes()
    assert_clean(log)
    text = log.decode()
    quoted = '"e\\n2026-01-01T00:00:00.000Z INFO x\\u001b[31m"'
    assert f"closing idle connection ({quoted})" in text
    assert f"rpc identity={quoted} role=admin" in text  # as before
