"""Helpers shared by test modules (importable as ``tests.support``; conftest files are not)."""

from __future__ import annotations

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


def skip_unless(condition: bool, reason: str) -> None:
    """Skip a test whose precondition does not hold here; in CI, fail instead.

    CI runs as root on a cgroup v1 machine: a test that needs root or cgroups must run there.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)
