"""scripts/gen-certs: the dev PKI's files, subjects, key modes and refusal to overwrite."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen-certs"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def subject(path: Path) -> dict[str, str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {a.oid._name: str(a.value) for a in cert.subject}


def test_writes_the_spec_layout_with_private_keys_0600(tmp_path: Path) -> None:
    result = run(str(tmp_path))
    assert result.returncode == 0, result.stderr
    for stem in ("ca", "server", "admin-client", "viewer-client", "client"):
        assert (tmp_path / f"{stem}-cert.pem").is_file()
        key = tmp_path / f"{stem}-key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert subject(tmp_path / "admin-client-cert.pem") == {
        "commonName": "admin",
        "organizationalUnitName": "admin",
        "organizationName": "jobworker",
    }
    assert subject(tmp_path / "viewer-client-cert.pem")["organizationalUnitName"] == "viewer"
    assert (tmp_path / "client-cert.pem").read_bytes() == (
        tmp_path / "admin-client-cert.pem"
    ).read_bytes()
    server = x509.load_pem_x509_certificate((tmp_path / "server-cert.pem").read_bytes())
    public_key = server.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    san = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }
    assert {"localhost", "127.0.0.1", "::1"} <= names


def test_chain_verifies_with_ssl(tmp_path: Path) -> None:
    assert run(str(tmp_path)).returncode == 0
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server-cert.pem", tmp_path / "server-key.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))
    client_ctx.load_cert_chain(tmp_path / "client-cert.pem", tmp_path / "client-key.pem")
    # Both contexts load: keys match their certificates (load_cert_chain checks).
    ca = x509.load_pem_x509_certificate((tmp_path / "ca-cert.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((tmp_path / "viewer-client-cert.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    assert run(str(tmp_path)).returncode == 0
    before = (tmp_path / "ca-cert.pem").read_bytes()
    again = run(str(tmp_path))
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr
    assert (tmp_path / "ca-cert.pem").read_bytes() == before
    assert run(str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "ca-cert.pem").read_bytes() != before


def test_issues_an_extra_client_from_the_existing_ca(tmp_path: Path) -> None:
    assert run(str(tmp_path)).returncode == 0
    result = run(str(tmp_path), "--client", "alice", "--role", "viewer", "--days", "2")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "alice-client-cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "viewer"
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 2 * 86400 <= lifetime.total_seconds() <= 2 * 86400 + 600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca-cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_extra_client_without_a_ca_is_a_clear_error(tmp_path: Path) -> None:
    result = run(str(tmp_path), "--client", "alice", "--role", "viewer")
    assert result.returncode == 1
    assert "ca-cert.pem not found" in result.stderr
    assert "Traceback" not in result.stderr
