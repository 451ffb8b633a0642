"""``jobworker-server --check``: a good set-up exits 0, each bad one 2 naming the problem,
and the port is never bound."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import pki
from tests.support import skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

MIB = 1024 * 1024


def check(
    certs: Path, data_dir: Path, *args: str, wrapper: Sequence[str] = (), cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "jobworker.server", "--check", "--certs-dir",
         str(certs), "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=data_dir.parent if cwd is None else cwd,
    )  # fmt: skip


def failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("FAIL")]


def would_enforce(result: subprocess.CompletedProcess[str]) -> str:
    [line] = [line for line in result.stdout.splitlines() if " would enforce: " in line]
    return line


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
    assert "pids-max 4096 per job" in would_enforce(result)
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


# --- isolation and the job user, established as at start ---------------------------------


def test_the_would_enforce_line_words_isolation_and_job_user_as_the_start_line(
    server: ServerProc, test_pki: TestPKI, tmp_path: Path
) -> None:
    started = re.search(r"job isolation: [^\n]*", server.log_text())
    assert started is not None, server.log_text()
    result = check(test_pki.dir, tmp_path / "other-data")
    assert result.returncode == 0, result.stdout
    assert would_enforce(result).startswith(f"ok   would enforce: {started.group(0)}; pids-max ")
    if os.geteuid() == 0:  # a root server isolates its jobs (the host has the namespaces)
        assert "ok   isolation: an isolated launch (pid, mount, cgroup) ran on this host" in (
            result.stdout.splitlines()
        )


def test_an_unusable_job_uid_range_would_not_start(test_pki: TestPKI, tmp_path: Path) -> None:
    skip_unless(os.geteuid() == 0, "the uid range is checked (and used) only by a root server")
    result = check(test_pki.dir, tmp_path / "data", "--job-uid-range", "1-10")
    assert result.returncode == 2, result.stdout
    assert failures(result) == [
        "FAIL job user: job uid range 1-10 overlaps /etc/passwd entry 'daemon' (1)"
    ]
    assert result.stdout.splitlines()[-1] == "would NOT start"


def test_an_explicit_isolation_the_host_cannot_provide_would_not_start(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    # A user namespace with no uid mapped makes the check a server that is not root (euid
    # 65534) while it keeps the files it owns: it cannot give jobs namespaces.
    unshare = shutil.which("unshare")
    skip_unless(unshare is not None, "util-linux unshare is not installed")
    assert unshare is not None
    probe = subprocess.run(
        [unshare, "--user", "true"], capture_output=True, check=False, timeout=60
    )
    skip_unless(probe.returncode == 0, f"cannot make a user namespace: {probe.stderr!r}")
    wrapper = [unshare, "--user"]
    refused = check(
        test_pki.dir, tmp_path / "data", "--isolation", "pid", "--cgroups", "off", wrapper=wrapper
    )
    assert refused.returncode == 2, refused.stdout
    assert failures(refused) == ["FAIL isolation: --isolation pid: pid: the server is not root"]
    # auto falls back to none with a warning, as the server does: it would start.
    fallback = check(test_pki.dir, tmp_path / "data", "--cgroups", "off", wrapper=wrapper)
    assert fallback.returncode == 0, fallback.stdout
    assert "WARN isolation: jobs are not isolated from the host: pid: the server is not root" in (
        fallback.stdout
    )
    assert would_enforce(fallback).startswith(
        "ok   would enforce: job isolation: none; jobs run as the server's user (uid 65534); "
    )


# --- the data dir --------------------------------------------------------------------------


def test_a_data_dir_that_cannot_be_created_would_not_start(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("")
    data = regular / "data"
    result = check(test_pki.dir, data, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert failures(result) == [f"FAIL data dir: {data} does not exist and cannot be created"]
    assert regular.is_file()


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_a_group_or_world_writable_data_dir_is_a_warning(
    test_pki: TestPKI, tmp_path: Path, mode: int
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    result = check(test_pki.dir, data)
    assert result.returncode == 0, result.stdout
    assert f"WARN data dir: {data} is writable by others (mode {mode:o})" in (
        result.stdout.splitlines()
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (mode 0700, so it is no world-writable data dir), unmounted after."""
    skip_unless(os.geteuid() == 0, "mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(disk)],
        check=True,
        timeout=60,
    )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=60)


def test_free_space_is_judged_against_the_min_free_disk_floor(
    test_pki: TestPKI, small_disk: Path
) -> None:
    low = check(test_pki.dir, small_disk, "--min-free-disk", str(3 * MIB))
    assert low.returncode == 0, low.stdout  # the server would start, and refuse CreateJob
    assert (
        "WARN data dir: 2.0 MiB free on the data disk, below the 3.0 MiB floor (--min-free-disk):"
        " CreateJob would answer RESOURCE_EXHAUSTED data disk full"
    ) in low.stdout.splitlines()
    # Below the default floor (64 MiB) too, but not below the configured one: fine.
    enough = check(test_pki.dir, small_disk, "--min-free-disk", str(MIB))
    assert enough.returncode == 0, enough.stdout
    assert (
        "ok   data dir: 2.0 MiB free on the data disk (CreateJob is refused below 1.0 MiB)"
    ) in enough.stdout.splitlines()
    default = check(test_pki.dir, small_disk)
    assert "below the 64 MiB floor (--min-free-disk)" in default.stdout


# --- resource control and certificates -----------------------------------------------------


def test_cgroups_require_without_cgroups_would_not_start(test_pki: TestPKI, tmp_path: Path) -> None:
    # A mount namespace of its own in which /sys/fs/cgroup is unmounted: a host without
    # cgroups, for the check alone.
    unshare = shutil.which("unshare")
    skip_unless(unshare is not None and os.geteuid() == 0, "needs root and util-linux unshare")
    assert unshare is not None
    no_cgroups = [unshare, "--mount", "sh", "-c", 'umount -R /sys/fs/cgroup && exec "$@"', "sh"]
    required = check(test_pki.dir, tmp_path / "data", "--cgroups", "require", wrapper=no_cgroups)
    assert required.returncode == 2, required.stdout + required.stderr
    assert failures(required) == [
        "FAIL resource control: cgroups required but unusable: no cgroup hierarchy is mounted"
    ]
    auto = check(test_pki.dir, tmp_path / "data", wrapper=no_cgroups)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert (
        "WARN resource control: RESOURCE LIMITS ARE NOT ENFORCED: no cgroup hierarchy is mounted"
        " (running without cgroups)"
    ) in auto.stdout.splitlines()


@pytest.mark.parametrize("broken", ["a directory", "missing"])
def test_an_unreadable_server_certificate_would_not_start(
    test_pki: TestPKI, tmp_path: Path, broken: str
) -> None:
    certs = certs_with_server(tmp_path, test_pki, test_pki.ca.issue_server())
    cert = certs / "server-cert.pem"
    cert.unlink()
    if broken == "a directory":
        cert.mkdir()
    result = check(certs, tmp_path / "data")
    assert result.returncode == 2, result.stdout
    why = "Is a directory" if broken == "a directory" else "No such file or directory"
    assert failures(result) == [f"FAIL certificates: cannot read {cert}: {why}"]


def test_the_quotas_are_listed_among_what_would_be_enforced(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    result = check(
        test_pki.dir,
        tmp_path / "data",
        "--max-running-jobs", "8",
        "--max-running-jobs-per-client", "2",
        "--role-limits", "admin:cpu=400,memory=8192",
        "--rate-limit", "20/s,40",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert (
        "max-running-jobs 8, max-running-jobs-per-client 2, "
        "role-limits admin:cpu=400,memory=8192, rate-limit 20/s,40 per client, "
    ) in would_enforce(result)
    plain = check(test_pki.dir, tmp_path / "data")
    assert "max-running-jobs" not in would_enforce(plain)
    assert "rate-limit" not in would_enforce(plain)
