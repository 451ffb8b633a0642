"""Development PKI: a CA, a server certificate and client certificates per role.

Used by ``scripts/gen-certs`` (dev certificates in ``certs/``) and by the tests
(a throwaway CA per test session, plus deliberately wrong certificates).
ECDSA P-256 keys; private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "jobworker"
DEFAULT_VALIDITY_DAYS = 365
# Back-date notBefore a little so a client whose clock is slightly behind accepts the cert.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM encoded."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Authority:
    """A certificate authority able to issue server and client certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def create(cls, common_name: str = "jobworker dev CA", days: int = 3650) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Authority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the CA key is not an EC key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)

    def issue_server(
        self, hosts: list[str] | None = None, days: int = DEFAULT_VALIDITY_DAYS
    ) -> Issued:
        """A server certificate for localhost, 127.0.0.1, ::1 and this host's name (plus hosts)."""
        names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *(hosts or [])]
        sans: list[x509.GeneralName] = []
        for entry in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                sans.append(x509.DNSName(entry))
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, "jobworker-server")]
        return self._issue(subject, ExtendedKeyUsageOID.SERVER_AUTH, days, sans=sans)

    def issue_client(
        self,
        name: str,
        role: str | None,
        days: int = DEFAULT_VALIDITY_DAYS,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A client certificate with subject CN=name, OU=role (omitted if None), O=jobworker."""
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if role is not None:
            subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
        subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION))
        return self._issue(
            subject,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            days,
            not_before=not_before,
            not_after=not_after,
        )

    def _issue(
        self,
        subject: list[x509.NameAttribute[str]],
        usage: x509.ObjectIdentifier,
        days: int,
        *,
        sans: list[x509.GeneralName] | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - CLOCK_SKEW)
            .not_valid_after(not_after or now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pem(path: Path, data: bytes, *, private: bool, force: bool = False) -> None:
    """Write a PEM file; private keys get mode 0600. Refuses to overwrite unless force."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    mode = 0o600 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_pair(directory: Path, stem: str, issued: Issued, *, force: bool = False) -> None:
    """Write <stem>-cert.pem and <stem>-key.pem into directory."""
    write_pem(directory / f"{stem}-cert.pem", issued.cert_pem, private=False, force=force)
    write_pem(directory / f"{stem}-key.pem", issued.key_pem, private=True, force=force)


def generate_dev_certs(
    directory: Path, *, days: int = DEFAULT_VALIDITY_DAYS, force: bool = False
) -> list[Path]:
    """Write the full dev set into directory; returns the files written.

    ca-cert.pem/ca-key.pem, server-*, admin-client-*, viewer-client-*, and
    client-* (a copy of the admin pair: the CLI's default).
    """
    directory.mkdir(parents=True, exist_ok=True)
    targets = ["ca", "server", "admin-client", "viewer-client", "client"]
    if not force:
        existing = [
            str(directory / f"{t}-{kind}.pem")
            for t in targets
            for kind in ("cert", "key")
            if (directory / f"{t}-{kind}.pem").exists()
        ]
        if existing:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    ca = Authority.create()
    write_pair(directory, "ca", Issued(ca.cert_pem, ca.key_pem), force=force)
    write_pair(directory, "server", ca.issue_server(days=days), force=force)
    admin = ca.issue_client("admin", "admin", days)
    write_pair(directory, "admin-client", admin, force=force)
    write_pair(directory, "viewer-client", ca.issue_client("viewer", "viewer", days), force=force)
    write_pair(directory, "client", admin, force=force)
    return [directory / f"{t}-{kind}.pem" for t in targets for kind in ("cert", "key")]


def issue_extra_client(
    directory: Path,
    name: str,
    role: str,
    *,
    days: int = DEFAULT_VALIDITY_DAYS,
    force: bool = False,
) -> list[Path]:
    """Issue <name>-client-cert.pem/-key.pem from the CA already in directory."""
    ca = Authority.load(
        (directory / "ca-cert.pem").read_bytes(), (directory / "ca-key.pem").read_bytes()
    )
    stem = f"{name}-client"
    write_pair(directory, stem, ca.issue_client(name, role, days), force=force)
    return [directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"]
