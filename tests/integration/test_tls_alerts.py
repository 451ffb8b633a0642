"""A handshake the server refuses ends with the TLS alert that says why.

Under TLS 1.3 the server judges the client certificate after the client has finished its side
of the handshake, so a client learns of a refusal only from the alert the server sends. Without
it, every client shows a bare EOF or reset and the reason is only in the server's log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from jobworker.client import ConnectError, open_client
from tests.support import skip_unless

if TYPE_CHECKING:
    from tests.integration.conftest import ServerProc
    from tests.support import TestPKI

REFUSALS = [
    (None, "certificate required"),
    ("foreign-client", "unknown ca"),
    ("expired-client", "certificate expired"),
]
# How grpcio's BoringSSL names the alerts it received (it logs them at ERROR on stderr; its
# status details only say UNAVAILABLE).
GRPCIO_ALERTS = {
    "unknown ca": "TLSV1_ALERT_UNKNOWN_CA",
    "certificate expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED",
}

GRPCIO_CLIENT = """
import sys

import grpc

from jobworker.api import worker_pb2, worker_pb2_grpc

address, ca, cert, key = sys.argv[1:5]
credentials = grpc.ssl_channel_credentials(
    open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read()
)
with grpc.secure_channel(address, credentials) as channel:
    try:
        worker_pb2_grpc.JobServiceStub(channel).GetJobs(worker_pb2.EmptyRequest(), timeout=10)
    except grpc.RpcError as exc:
        print(exc.code().name)
"""


def s_client(
    server: ServerProc, test_pki: TestPKI, stem: str | None, *, wait_for_alert: bool = True
) -> str:
    openssl = shutil.which("openssl")
    skip_unless(openssl is not None, "openssl is not installed")
    assert openssl is not None
    command = [openssl, "s_client", "-connect", server.address, "-tls1_3", "-alpn", "h2"]
    command += ["-CAfile", str(test_pki.ca_cert)]
    if wait_for_alert:
        command.append("-ign_eof")
    if stem is not None:
        command += ["-cert", str(test_pki.cert(stem)), "-key", str(test_pki.key(stem))]
    # Some bytes after the handshake make s_client read, which is where a TLS 1.3 client meets
    # the server's verdict; then stdin's EOF (with -ign_eof) lets it wait for the alert.
    result = subprocess.run(
        command, input=b"PRI * HTTP/2.0\r\n\r\n", capture_output=True, timeout=20, check=False
    )
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.parametrize(("stem", "alert"), REFUSALS)
def test_openssl_s_client_reads_the_alert(
    server: ServerProc, test_pki: TestPKI, stem: str | None, alert: str
) -> None:
    output = s_client(server, test_pki, stem)
    assert f"alert {alert}" in output, output
    server.wait_for_log("TLS handshake with .* failed")


def test_an_accepted_certificate_gets_no_alert(server: ServerProc, test_pki: TestPKI) -> None:
    output = s_client(server, test_pki, "admin-client", wait_for_alert=False)
    assert "alert" not in output.lower(), output


@pytest.mark.parametrize(("stem", "alert"), REFUSALS[1:])
def test_grpcio_reports_the_alert(
    server: ServerProc, test_pki: TestPKI, stem: str, alert: str
) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-c", GRPCIO_CLIENT, server.address),
            *(str(test_pki.ca_cert), str(test_pki.cert(stem)), str(test_pki.key(stem))),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.decode().split() == ["UNAVAILABLE"]
    assert GRPCIO_ALERTS[alert] in result.stderr.decode(errors="replace"), result.stderr


@pytest.mark.parametrize(("stem", "alert"), REFUSALS[1:])
async def test_our_client_names_the_reason(
    server: ServerProc, test_pki: TestPKI, stem: str, alert: str
) -> None:
    with pytest.raises(ConnectError) as caught:
        async with open_client(
            server.address, cert=test_pki.cert(stem), key=test_pki.key(stem), ca=test_pki.ca_cert
        ):
            pass
    expected_alert = alert.replace("unknown ca", "unknown CA")
    assert str(caught.value) == f"the server refused our certificate: {expected_alert}"
