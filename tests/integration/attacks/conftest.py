"""Fixtures for the attack suite: a server with short timeouts and an ``Arena`` around it.

The arena holds a finished reference job, a well-behaved probe with its baseline latencies
(measured before any attack, in the same test) and the server's baseline RSS / fd count.
``arena.attack(what)`` runs the probe during the block, then asserts the probe was unaffected
and the server's resources came back near baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import trio

from jobworker.api import worker_pb2_grpc
from tests.integration.attacks import tools
from tests.integration.conftest import ServerProc, start_server

if TYPE_CHECKING:
    from tests.conftest import TestPKI

HANDSHAKE_TIMEOUT_S = 1.0  # short, so stalled handshakes are dropped within the test
IDLE_TIMEOUT_S = 3.0  # short, so idle connections are closed within the test
ATTACK_FLAGS = (
    "--handshake-timeout",
    str(HANDSHAKE_TIMEOUT_S),
    "--idle-timeout",
    str(IDLE_TIMEOUT_S),
)


@dataclass
class Arena:
    """A running server under test, a reference job and a measured well-behaved client."""

    srv: ServerProc
    test_pki: TestPKI
    channel: grpc.Channel
    stub: worker_pb2_grpc.JobServiceStub
    job_id: str
    probe: tools.Probe
    resources: tools.Resources

    @property
    def address(self) -> str:
        return self.srv.address

    def tls(self, stem: str = "admin-client") -> tools.ssl.SSLContext:
        return tools.client_ssl_context(self.test_pki, stem)

    def log_offset(self) -> int:
        return len(self.srv.log_text())

    @contextlib.asynccontextmanager
    async def attack(
        self, what: str, *, fresh: bool = False, settle: bool = True, **settle_kw: float
    ) -> AsyncIterator[tools.ProbeLoop]:
        """Probe (in another process) before and during the block (``fresh``: a new TLS
        connection per probe); afterwards assert the probe was unaffected and (``settle``)
        the server's fds and RSS came back near their baseline."""
        loop = tools.ProbeLoop(self.address, self.test_pki, self.job_id, fresh=fresh)
        async with loop.running():
            yield loop
        print(tools.assert_unaffected(loop.baseline, loop.samples, what))
        if settle:
            now = await trio.to_thread.run_sync(self.settle_now, settle_kw)
            print(f"{what}: server baseline {self.resources}, after {now}")

    def settle_now(self, settle_kw: dict[str, float] | None = None) -> tools.Resources:
        return tools.wait_resources_back(self.srv.pid, self.resources, **(settle_kw or {}))  # type: ignore[arg-type]


def make_arena(srv: ServerProc, test_pki: TestPKI) -> Iterator[Arena]:
    channel = grpc.secure_channel(srv.address, tools.grpc_credentials(test_pki, "admin-client"))
    stub = worker_pb2_grpc.JobServiceStub(channel)
    probe: tools.Probe | None = None
    try:
        job_id = tools.create_reference_job(stub)
        probe = tools.Probe(srv.address, test_pki, job_id)
        probe.baseline(3)  # the server answers; the measured baseline is the probe process's
        yield Arena(
            srv=srv,
            test_pki=test_pki,
            channel=channel,
            stub=stub,
            job_id=job_id,
            probe=probe,
            resources=tools.resources(srv.pid),
        )
    finally:
        if probe is not None:
            probe.close()
        channel.close()


@contextlib.contextmanager
def open_arena(test_pki: TestPKI, tmp_path: Path, *extra_args: str) -> Iterator[Arena]:
    """An arena on a server started with ATTACK_FLAGS plus ``extra_args`` (later flags win)."""
    with start_server(test_pki, tmp_path, *ATTACK_FLAGS, *extra_args) as srv:
        yield from make_arena(srv, test_pki)


@pytest.fixture
def attack_server(test_pki: TestPKI, tmp_path: Path) -> Iterator[ServerProc]:
    """The real server with short handshake and idle timeouts."""
    with start_server(test_pki, tmp_path, *ATTACK_FLAGS) as srv:
        yield srv


@pytest.fixture
def arena(attack_server: ServerProc, test_pki: TestPKI) -> Iterator[Arena]:
    yield from make_arena(attack_server, test_pki)
