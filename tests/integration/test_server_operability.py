"""Certificate reload on SIGHUP, systemd readiness (sd_notify) and the unit file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker import pki
from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "jobworker.service"
SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def _credentials(certs: Path, stem: str = "admin-client") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca-cert.pem").read_bytes(),
        private_key=(certs / f"{stem}-key.pem").read_bytes(),
        certificate_chain=(certs / f"{stem}-cert.pem").read_bytes(),
    )


def _list(channel: grpc.Channel) -> int:
    stub = worker_pb2_grpc.JobServiceStub(channel)
    return len(stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs)


def _served_copy(test_pki: TestPKI, tmp_path: Path) -> Path:
    """A certs dir of the server's own files, copied from the test PKI (free to rotate)."""
    served = tmp_path / "served-certs"
    served.mkdir()
    for name in SERVER_FILES:
        shutil.copy(test_pki.dir / name, served / name)
    return served


def test_sighup_reloads_the_certificates_for_new_connections(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    served = _served_copy(test_pki, tmp_path)
    with server_factory("--certs-dir", str(served)) as srv:
        old = grpc.secure_channel(srv.address, _credentials(test_pki.dir))
        assert _list(old) == 0  # an established connection, made with the old CA

        rotated = tmp_path / "rotated"
        pki.generate_dev_certs(rotated)  # a new CA, a new server and client certificates
        for name in SERVER_FILES:
            shutil.copy(rotated / name, served / name)
        srv.process.send_signal(signal.SIGHUP)
        log = srv.wait_for_log(r"certificates reloaded from .* expires \d{4}-\d\d-\d\dT")
        assert "Traceback" not in log

        with grpc.secure_channel(srv.address, _credentials(rotated)) as new:
            assert _list(new) == 0
        with grpc.secure_channel(srv.address, _credentials(test_pki.dir)) as refused:
            with pytest.raises(grpc.RpcError) as caught:
                _list(refused)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _list(old) == 0  # still served on its own connection
        old.close()


def test_a_bad_reload_keeps_the_current_certificates(
    server_factory: ServerFactory, test_pki: TestPKI, tmp_path: Path
) -> None:
    served = _served_copy(test_pki, tmp_path)
    with server_factory("--certs-dir", str(served)) as srv:
        (served / "server-key.pem").write_text("not a key\n")
        srv.process.send_signal(signal.SIGHUP)
        srv.wait_for_log("certificates not reloaded, the current ones stay: invalid server")
        with grpc.secure_channel(srv.address, _credentials(test_pki.dir)) as channel:
            assert _list(channel) == 0


def test_readiness_and_stopping_are_sent_to_notify_socket(
    server_factory: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        with server_factory() as srv:
            ready = manager.recv(4096).decode().splitlines()
            assert ready == ["READY=1", f"STATUS=listening on {srv.address}"]
            assert srv.stop() == 0
            assert manager.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    skip_unless(analyze is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert analyze is not None
    # verify wants ExecStart's binary to exist: point it at an executable of ours.
    fake_bin = tmp_path / "jobworker-server"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    unit = tmp_path / "jobworker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/jobworker-server", str(fake_bin)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [
        line for line in result.stderr.splitlines() if str(unit) in line or "jobworker" in line
    ]
    assert result.returncode == 0, result.stderr
    assert problems == [], result.stderr
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Delegate=yes",
        "KillMode=mixed",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text.splitlines()
