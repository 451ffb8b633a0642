"""``jobworker-server --check``: a good set-up exits 0, each bad one 2 naming the problem,
and the port is never bound."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import pki

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc


def check(certs: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobworker.server", "--check", "--certs-dir", str(certs),
         "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=data_dir.parent,
    )  # fmt: skip


def certs_with_server(tmp_path: Path, test_pki: TestPKI, issued: pki.Issued) -> Path:
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(test_pki.ca_cert, certs / "ca-cert.pem")
    pki.write_pair(certs, "server", issued)
    return certs


def test_a_good_set_up_would_start(test_pki: TestPKI, tmp_path: Path) -> None:
    result = check(test_pki.dir, tmp_path / "data")
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[-1] == "would start"
    assert not [line for line in lines if line.startswith("FAIL")]
    assert "ok   certificates: server-cert.pem chains to ca-cert.pem" in lines
    assert "ok   certificates: the server certificate covers 127.0.0.1" in lines
    assert any(line.startswith("ok   would enforce: pids-max 4096 per job") for line in lines)
    assert not (tmp_path / "data").exists()  # checked, not created


def test_check_does_not_bind_the_port(
    server: ServerProc, test_pki: TestPKI, tmp_path: Path
) -> None:
    result = check(test_pki.dir, tmp_path / "other", "--listen", server.address)
    assert result.returncode == 0, result.stdout


def test_a_data_dir_in_use_would_not_start(server: ServerProc, test_pki: TestPKI) -> None:
    result = check(test_pki.dir, server.data_dir)
    assert result.returncode == 2
    assert f"FAIL data dir: {server.data_dir} is in use by another jobworker-server" in (
        result.stdout.splitlines()
    )
    assert result.stdout.splitlines()[-1] == "would NOT start"


def test_a_data_dir_that_is_a_file_would_not_start(test_pki: TestPKI, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("")
    result = check(test_pki.dir, data)
    assert result.returncode == 2
    assert f"FAIL data dir: {data} is not a directory" in result.stdout.splitlines()


def test_a_server_certificate_of_another_ca_would_not_start(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    other = pki.Authority.create("another CA")
    certs = certs_with_server(tmp_path, test_pki, other.issue_server())
    result = check(certs, tmp_path / "data")
    assert result.returncode == 2
    assert "FAIL certificates: server-cert.pem is not signed by ca-cert.pem" in result.stdout


def test_an_expired_server_certificate_would_not_start(test_pki: TestPKI, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    issued = test_pki.ca._issue(
        [x509.NameAttribute(NameOID.COMMON_NAME, "jobworker-server")],
        ExtendedKeyUsageOID.SERVER_AUTH,
        1,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    certs = certs_with_server(tmp_path, test_pki, issued)
    result = check(certs, tmp_path / "data")
    assert result.returncode == 2
    assert "FAIL certificates: server-cert.pem expired " in result.stdout


def test_a_certificate_expiring_soon_is_a_warning(test_pki: TestPKI, tmp_path: Path) -> None:
    certs = certs_with_server(tmp_path, test_pki, test_pki.ca.issue_server(days=10))
    result = check(certs, tmp_path / "data")
    assert result.returncode == 0, result.stdout
    assert "WARN certificates: server-cert.pem expires soon: " in result.stdout


def test_a_listen_host_outside_the_san_would_not_start(test_pki: TestPKI, tmp_path: Path) -> None:
    result = check(test_pki.dir, tmp_path / "data", "--listen", "127.0.0.2:50051")
    assert result.returncode == 2
    assert "FAIL certificates: the server certificate does not cover the listen host 127.0.0.2" in (
        result.stdout
    )


@pytest.mark.parametrize("broken", ["missing key", "key of another certificate"])
def test_an_unusable_key_would_not_start(test_pki: TestPKI, tmp_path: Path, broken: str) -> None:
    certs = certs_with_server(tmp_path, test_pki, test_pki.ca.issue_server())
    if broken == "missing key":
        (certs / "server-key.pem").unlink()
    else:
        (certs / "server-key.pem").write_bytes(test_pki.ca.issue_server().key_pem)
    result = check(certs, tmp_path / "data")
    assert result.returncode == 2
    assert result.stdout.splitlines()[0].startswith("FAIL certificates: ")
