"""``jobworker-server --check``: would the server start with this configuration?

Checks the certificates (readable, key matches, chains to the CA, dates, the listen host in
the server's SAN), the data dir (exists or can be created, permissions, free space, not
locked by a running server) and resource control, prints one line per finding and what
would be enforced, and never binds the port. Exit 0 if it would start (warnings allowed), 2
if not. Resource control is probed as the server does (a probe cgroup is made and removed).
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import ipaddress
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from jobworker.cgroups.detect import CgroupsUnavailable, detect_controller
from jobworker.server.app import instance_name
from jobworker.server.config import ServerConfig
from jobworker.server.tls import (
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    CertificateError,
    build_server_context,
)

EXPIRY_WARNING = dt.timedelta(days=30)  # time enough to rotate before clients are refused
LOW_DISK_BYTES = 64 * 1024 * 1024  # below this, job output will soon be lost


class Level(enum.Enum):
    OK = "ok"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.level.value:<4} {self.what}: {self.detail}"


def _certificates(config: ServerConfig, now: dt.datetime) -> Iterator[Finding]:
    what = "certificates"
    try:
        build_server_context(config.certs_dir)  # readable, parseable, the key matches
    except CertificateError as exc:
        yield Finding(Level.FAIL, what, str(exc))
        return
    try:
        cert = x509.load_pem_x509_certificate((config.certs_dir / SERVER_CERT_FILE).read_bytes())
        cas = x509.load_pem_x509_certificates((config.certs_dir / CA_CERT_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        yield Finding(Level.FAIL, what, f"cannot parse the certificates: {exc}")
        return
    yield Finding(Level.OK, what, f"{config.certs_dir}: server key matches its certificate")
    if any(_issued_by(cert, ca) for ca in cas):
        yield Finding(Level.OK, what, f"{SERVER_CERT_FILE} chains to {CA_CERT_FILE}")
    else:
        yield Finding(Level.FAIL, what, f"{SERVER_CERT_FILE} is not signed by {CA_CERT_FILE}")
    for name, certificate in ((SERVER_CERT_FILE, cert), *((CA_CERT_FILE, ca) for ca in cas)):
        yield _dates(name, certificate, now)
    yield _san(cert, config.host)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _dates(name: str, cert: x509.Certificate, now: dt.datetime) -> Finding:
    after = cert.not_valid_after_utc
    stamp = f"{after:%Y-%m-%dT%H:%M:%SZ}"
    if cert.not_valid_before_utc > now:
        return Finding(Level.FAIL, "certificates", f"{name} is not valid before {stamp}")
    if after <= now:
        return Finding(Level.FAIL, "certificates", f"{name} expired {stamp}")
    if after - now < EXPIRY_WARNING:
        return Finding(Level.WARN, "certificates", f"{name} expires soon: {stamp}")
    return Finding(Level.OK, "certificates", f"{name} valid until {stamp}")


def _san(cert: x509.Certificate, host: str) -> Finding:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Finding(Level.FAIL, "certificates", f"{SERVER_CERT_FILE} has no subjectAltName")
    names = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    listed = ", ".join([*names, *ips])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        covered = host.lower() in (n.lower() for n in names)
    else:
        if address.is_unspecified:
            return Finding(
                Level.WARN,
                "certificates",
                f"listening on every address: clients must connect by a name the server "
                f"certificate lists ({listed})",
            )
        covered = str(address) in ips
    if covered:
        return Finding(Level.OK, "certificates", f"the server certificate covers {host}")
    return Finding(
        Level.FAIL,
        "certificates",
        f"the server certificate does not cover the listen host {host} (it lists {listed})",
    )


def _data_dir(config: ServerConfig) -> Iterator[Finding]:
    what = "data dir"
    path = config.data_dir
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path:
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            yield Finding(Level.FAIL, what, f"{path} does not exist and cannot be created")
            return
        yield Finding(Level.OK, what, f"{path} does not exist yet; it will be created")
    else:
        info = path.stat()
        if not stat.S_ISDIR(info.st_mode):
            yield Finding(Level.FAIL, what, f"{path} is not a directory")
            return
        if not os.access(path, os.W_OK | os.X_OK):
            yield Finding(Level.FAIL, what, f"{path} is not writable")
            return
        if info.st_uid != os.geteuid():
            yield Finding(Level.WARN, what, f"{path} is owned by uid {info.st_uid}, not us")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            yield Finding(
                Level.WARN, what, f"{path} is writable by others (mode {info.st_mode & 0o777:o})"
            )
        yield from _lock(path)
    disk = os.statvfs(existing)
    free = disk.f_bavail * disk.f_frsize
    level = Level.WARN if free < LOW_DISK_BYTES else Level.OK
    yield Finding(level, what, f"{free // (1024 * 1024)} MiB free on the data disk")


def _lock(path: Path) -> Iterator[Finding]:
    lock = path / ".lock"
    if not lock.exists():
        yield Finding(Level.OK, "data dir", f"{path} is not in use")
        return
    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        yield Finding(Level.FAIL, "data dir", f"{path} is in use by another jobworker-server")
        return
    finally:
        os.close(fd)  # also releases the lock, if taken
    yield Finding(Level.OK, "data dir", f"{path} is not in use")


def _resource_control(config: ServerConfig, data_dir_busy: bool) -> Iterator[Finding]:
    if data_dir_busy:  # the server that runs there holds the subtree a probe would touch
        yield Finding(Level.OK, "resource control", "not probed: a server runs on the data dir")
        return
    # detect_controller logs why it falls back; the finding says it here instead.
    logging.getLogger("jobworker.cgroups").setLevel(logging.CRITICAL)
    try:
        controller = detect_controller(
            config.cgroups, pids_max=config.pids_max, root_name=instance_name(config.data_dir)
        )
    except CgroupsUnavailable as exc:
        yield Finding(Level.FAIL, "resource control", str(exc))
        return
    # The probe may leave this instance's (empty) subtree: remove it, as a shutdown would.
    trio.run(controller.remove_roots)
    description = getattr(controller, "description", "")
    if description:
        yield Finding(Level.OK, "resource control", description)
    elif config.cgroups == "off":
        yield Finding(Level.WARN, "resource control", "off (--cgroups off): no limits enforced")
    else:
        yield Finding(Level.WARN, "resource control", "no usable cgroups: no limits enforced")


def _enforced(config: ServerConfig) -> Finding:
    limits = config.limits
    return Finding(
        Level.OK,
        "would enforce",
        f"pids-max {config.pids_max} per job, stop grace {config.stop_grace:g} s, "
        f"max-connections {config.max_connections}, max-concurrent-streams "
        f"{limits.max_concurrent_streams}, max-message-bytes {limits.max_message_bytes}, "
        f"idle-timeout {limits.idle_timeout:g} s, handshake-timeout "
        f"{config.handshake_timeout:g} s; TLS 1.3 with client certificates only",
    )


def run_check(config: ServerConfig, write: Callable[[str], None]) -> bool:
    """Write one line per finding through ``write``; True if the server would start."""
    now = dt.datetime.now(dt.UTC)
    findings = [*_certificates(config, now), *_data_dir(config)]
    busy = any(f.level is Level.FAIL and "in use" in f.detail for f in findings)
    findings += [*_resource_control(config, busy), _enforced(config)]
    for finding in findings:
        write(finding.line())
    ok = all(f.level is not Level.FAIL for f in findings)
    write("would start" if ok else "would NOT start")
    return ok
