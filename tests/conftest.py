"""Fixtures shared by every test: a throwaway PKI per test session.

Integration fixtures (the real server process) live in tests/integration/conftest.py.
"""

from __future__ import annotations

import datetime as dt

import pytest

from jobworker import pki
from tests.support import IN_CI, TestPKI, skip_unless

__all__ = ["IN_CI", "TestPKI", "skip_unless"]

pytest_plugins = ["tests.timelimits", "pytester"]


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
    pki.write_pair(directory, "alice-client", ca.issue_client("alice", "admin"))
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI every test must run: a skip (other than an expected failure) becomes a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"
