"""``jobworker-server --check``: would the server start with this configuration?

Checks the certificates (readable, key matches, chains to the CA, dates, the listen host in
the server's SAN), the data dir (exists or can be created, permissions, free space against
the ``--min-free-disk`` floor, not locked by a running server), resource control, the job
user and the jobs' isolation, prints one line per finding and what would be enforced, and
never binds the port. Exit 0 if it would start (warnings allowed), 2 if not. Resource
control, users and isolation are established as the server does at start: a probe cgroup is
made and removed, the uid range is checked against /etc, and one isolated launch of
/bin/true is tried through a launcher of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import ipaddress
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from jobworker.cgroups.detect import CgroupsUnavailable, detect_controller
from jobworker.engine.manager import default_min_free_disk
from jobworker.errors import leaves
from jobworker.launch.isolation import (
    IsolationSetting,
    IsolationUnusable,
    establish_isolation,
    parse_isolation,
)
from jobworker.launch.launcher import open_launcher
from jobworker.launch.request import Isolation
from jobworker.launch.users import JobUsers, UsersUnusable
from jobworker.server.app import describe_sandbox, instance_name
from jobworker.server.config import ServerConfig
from jobworker.server.tls import (
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    CertificateError,
    build_server_context,
)

EXPIRY_WARNING = dt.timedelta(days=30)  # time enough to rotate before clients are refused
MIB = 1024 * 1024


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
    yield _free_space(existing, config.min_free_disk)


def _mib(size: int) -> str:
    return f"{size // MIB} MiB" if size >= 10 * MIB else f"{size / MIB:.1f} MiB"


def _free_space(path: Path, min_free_disk: int | None) -> Finding:
    """Free space on the data disk against the floor below which the server refuses
    CreateJob: ``--min-free-disk``, else the engine's default for a disk of that size."""
    disk = os.statvfs(path)  # as the engine's store measures it: what we may use
    free, total = disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize
    floor = default_min_free_disk(total) if min_free_disk is None else min_free_disk
    if free < floor:
        return Finding(
            Level.WARN,
            "data dir",
            f"{_mib(free)} free on the data disk, below the {_mib(floor)} floor "
            "(--min-free-disk): CreateJob would answer RESOURCE_EXHAUSTED data disk full",
        )
    return Finding(
        Level.OK,
        "data dir",
        f"{_mib(free)} free on the data disk (CreateJob is refused below {_mib(floor)})",
    )


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
    with _warnings_of("jobworker.cgroups") as warnings:  # why it falls back, under auto
        try:
            controller = detect_controller(
                config.cgroups, pids_max=config.pids_max, root_name=instance_name(config.data_dir)
            )
        except CgroupsUnavailable as exc:
            yield Finding(Level.FAIL, "resource control", str(exc))
            return
    # The probe may leave this instance's (empty) subtree: remove it, as a shutdown would.
    trio.run(controller.remove_roots)
    if controller.enforced:
        yield Finding(Level.OK, "resource control", controller.description)
    elif config.cgroups == "off":
        yield Finding(Level.WARN, "resource control", "off (--cgroups off): no limits enforced")
    else:
        why = "; ".join(warnings) or "no usable cgroups: no limits enforced"
        yield Finding(Level.WARN, "resource control", why)


def _job_user(config: ServerConfig) -> tuple[list[Finding], JobUsers | None]:
    """Who jobs would run as, decided as at start (a uid range checked against /etc)."""
    try:
        users = JobUsers.from_settings(config.job_user, config.job_uid_range)
    except UsersUnusable as exc:
        return [Finding(Level.FAIL, "job user", str(exc))], None
    if not users.dynamic:
        return [], users
    return [
        Finding(
            Level.OK,
            "job user",
            f"uid range {config.job_uid_range} is free of /etc/passwd, /etc/group, "
            "/etc/subuid and /etc/subgid entries",
        )
    ], users


class _Caught(logging.Handler):
    """Keeps the messages of the records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_of(name: str) -> Iterator[list[str]]:
    """The WARNING (and worse) messages of logger ``name`` meanwhile, kept off stderr: the
    findings say them instead."""
    logger = logging.getLogger(name)
    caught, propagate = _Caught(), logger.propagate
    logger.addHandler(caught)
    logger.propagate = False
    try:
        yield caught.messages
    finally:
        logger.removeHandler(caught)
        logger.propagate = propagate


async def _probe_isolation(setting: IsolationSetting, work_dir: str) -> Isolation:
    """establish_isolation through a launcher of our own, as the server does at start."""
    async with trio.open_nursery() as nursery, open_launcher(nursery) as launcher:
        return await establish_isolation(launcher, setting, work_dir)


def _isolation(config: ServerConfig) -> tuple[list[Finding], Isolation | None]:
    """The namespaces jobs would get, tried for real: an explicit ``--isolation`` the host
    cannot provide fails; ``auto`` falls back (to none) with a warning, as at start."""
    what = "isolation"
    setting = parse_isolation(config.isolation)  # validated when the flags were read
    with contextlib.ExitStack() as stack:
        # The server probes in its data dir, which it has made by then; this one may not exist.
        data_dir = config.data_dir
        work_dir = (
            str(data_dir.resolve())
            if data_dir.is_dir()
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="jobworker-check-"))
        )
        warnings = stack.enter_context(_warnings_of("jobworker.launch"))
        isolation: Isolation | None = None
        refused: list[str] = []
        try:
            isolation = trio.run(_probe_isolation, setting, work_dir)
        except* (IsolationUnusable, OSError) as group:  # OSError: the launcher did not start
            refused = [str(leaf) for leaf in leaves(group)]
    if isolation is None:
        return [Finding(Level.FAIL, what, why) for why in refused], None
    findings = [Finding(Level.WARN, what, message) for message in warnings]
    if isolation.names:
        findings.append(
            Finding(Level.OK, what, f"an isolated launch ({isolation.describe()}) ran on this host")
        )
    return findings, isolation


def _job_timeouts(config: ServerConfig) -> str:
    """The job time limits, as the "would enforce" line lists them ("" when there are none)."""
    default, maximum = config.default_job_timeout, config.max_job_timeout
    if default is None and maximum is None:
        return ""
    applied = default if default is not None else maximum
    limit = f", at most {maximum} s" if maximum is not None else ""
    return f"job timeout {applied} s unless asked{limit}, "


def _quotas(config: ServerConfig) -> str:
    """The quotas, as the "would enforce" line lists them ("" when there are none)."""
    parts = []
    if config.max_running_jobs is not None:
        parts.append(f"max-running-jobs {config.max_running_jobs}")
    if config.max_running_jobs_per_client is not None:
        parts.append(f"max-running-jobs-per-client {config.max_running_jobs_per_client}")
    if config.role_limits is not None:
        parts.append(f"role-limits {config.role_limits}")
    if config.rate_limit is not None:
        parts.append(f"rate-limit {config.rate_limit} per client")
    return "".join(f"{part}, " for part in parts)


def _enforced(config: ServerConfig, sandbox: str | None) -> Finding:
    limits = config.limits
    return Finding(
        Level.OK,
        "would enforce",
        f"{f'{sandbox}; ' if sandbox else ''}"
        f"pids-max {config.pids_max} per job, stop grace {config.stop_grace:g} s, "
        f"{_job_timeouts(config)}"
        f"{_quotas(config)}"
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
    findings += _resource_control(config, busy)
    user_findings, users = _job_user(config)
    isolation_findings, isolation = _isolation(config)
    findings += [*user_findings, *isolation_findings]
    sandbox = None if users is None or isolation is None else describe_sandbox(isolation, users)
    findings.append(_enforced(config, sandbox))
    for finding in findings:
        write(finding.line())
    ok = all(f.level is not Level.FAIL for f in findings)
    write("would start" if ok else "would NOT start")
    return ok
