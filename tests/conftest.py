"""Fixtures shared by every test: a throwaway PKI per test session.

Integration fixtures (the real server process) live in tests/integration/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobworker import pki

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class TestPKI:
    """A certs dir laid out as scripts/gen-certs writes it, plus odd certificates for attacks.

    ``dir`` holds ca-cert.pem, server-*.pem, admin-client-*, viewer-client-*,
    client-* (admin). Extra pairs, all as <stem>-cert.pem / <stem>-key.pem in
    ``dir``: ``noou-client`` (no OU), ``guest-client`` (OU=guest),
    ``expired-client`` (expired yesterday), ``foreign-client`` (signed by
    another CA, OU=admin).
    """

    dir: Path
    ca: pki.Authority

    def cert(self, stem: str) -> Path:
        return self.dir / f"{stem}-cert.pem"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}-key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca-cert.pem"


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    directory = tmp_path_factory.mktemp("pki")
    pki.generate_dev_certs(directory)
    ca = pki.Authority.load(
        (directory / "ca-cert.pem").read_bytes(), (directory / "ca-key.pem").read_bytes()
    )
    now = dt.datetime.now(dt.UTC)
    pki.write_pair(directory, "noou-client", ca.issue_client("nobody", None))
    pki.write_pair(directory, "guest-client", ca.issue_client("guest", "guest"))
    pki.write_pair(
        directory,
        "expired-client",
        ca.issue_client(
            "old",
            "admin",
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ),
    )
    other = pki.Authority.create("another CA")
    pki.write_pair(directory, "foreign-client", other.issue_client("mallory", "admin"))
    return TestPKI(directory, ca)


def skip_unless(condition: bool, reason: str) -> None:
    """Skip a test whose precondition does not hold here; in CI, fail instead.

    CI runs as root on a cgroup v1 machine: a test that needs root or cgroups must run there.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI every test must run: a skip (other than an expected failure) becomes a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"
