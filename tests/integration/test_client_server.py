"""The client module against the real server: every call, the spec's errors, clean exits.

The server runs without cgroups: nothing here is about limits, and a server starting elsewhere
on the machine sweeps every ``jobworker/*`` cgroup (killing other servers' jobs).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio

from jobworker.client import ConnectError, JobClient, RpcError, open_client

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

WAIT_S = 10.0


@pytest.fixture
def plain_server(server_factory: ServerFactory) -> Iterator[ServerProc]:
    with server_factory("--cgroups", "off") as srv:
        yield srv


@asynccontextmanager
async def connect(
    test_pki: TestPKI, server: ServerProc, stem: str = "admin-client"
) -> AsyncIterator[JobClient]:
    async with open_client(
        server.address, cert=test_pki.cert(stem), key=test_pki.key(stem), ca=test_pki.ca_cert
    ) as client:
        yield client


async def wait_ended(client: JobClient, job_id: str) -> str:
    with trio.fail_after(WAIT_S):
        while True:
            status = (await client.get(job_id)).status
            if status not in ("INITIALIZING", "RUNNING"):
                return status
            await trio.sleep(0.02)


async def test_every_call_and_the_spec_errors(test_pki: TestPKI, plain_server: ServerProc) -> None:
    async with connect(test_pki, plain_server) as client:
        created = await client.create("sh", ["-c", "printf 'a\\0b'; exit 0"], max_cpu=50)
        assert created.status == "RUNNING"
        assert (created.command, list(created.args), created.maxCPU) == (
            "sh",
            ["-c", "printf 'a\\0b'; exit 0"],
            50,
        )
        assert await wait_ended(client, created.id) == "COMPLETED"
        async with client.stream(created.id) as output:
            assert b"".join([chunk async for chunk in output]) == b"a\0b"
        assert created.id in [job.id for job in await client.list()]

        sleeper = await client.create("sleep", ["30"])
        stopped = await client.stop(sleeper.id)
        assert (stopped.id, stopped.status) == (sleeper.id, "STOPPED")

        expected = [
            (client.get("999"), "NOT_FOUND", "job not found: 999"),
            (
                client.stop(sleeper.id),
                "FAILED_PRECONDITION",
                f"job is not running: {sleeper.id} (current status: STOPPED)",
            ),
            (
                client.create("invalid-command"),
                "INVALID_ARGUMENT",
                "command not found in PATH: invalid-command",
            ),
        ]
        for call, code_name, message in expected:
            with pytest.raises(RpcError) as caught:
                await call
            assert (caught.value.code_name, str(caught.value)) == (code_name, message)
        with pytest.raises(RpcError) as caught:
            async with client.stream("999") as output:
                await output.__anext__()
        assert (caught.value.code_name, str(caught.value)) == ("NOT_FOUND", "job not found: 999")

    async with connect(test_pki, plain_server, "viewer-client") as viewer:
        with pytest.raises(RpcError) as caught:
            await viewer.create("echo")
        assert caught.value.code_name == "PERMISSION_DENIED"
        assert str(caught.value) == "role viewer is not allowed to perform operation create_job"
        assert (await viewer.get(created.id)).status == "COMPLETED"


async def test_cancelled_stream_is_cancelled_on_the_server_and_sockets_are_closed(
    test_pki: TestPKI, plain_server: ServerProc
) -> None:
    baseline_fds = plain_server.fd_count()
    async with connect(test_pki, plain_server) as client:
        job = await client.create(
            "python3", ["-u", "-c", "print('up'); import time; time.sleep(60)"]
        )
        with trio.move_on_after(WAIT_S) as timeout:
            async with client.stream(job.id) as output:
                received = b""
                while received != b"up\n":  # print() may write "up" and "\n" apart
                    received += await output.__anext__()
                # leave while the server is waiting for more output
        assert not timeout.cancelled_caught
        await trio.to_thread.run_sync(
            plain_server.wait_for_log,
            rf"method=GetJobsStream op=stream_job job={job.id} outcome=CANCELLED",
        )
        # 50 calls at once on one connection
        results: list[str] = []

        async def get() -> None:
            results.append((await client.get(job.id)).status)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(get)
        assert results == ["RUNNING"] * 50
        await client.stop(job.id)
    # the server sees the connection closed: its fds come back (a job's pipe included)
    deadline = time.monotonic() + WAIT_S
    while plain_server.fd_count() > baseline_fds:
        assert time.monotonic() < deadline, f"{plain_server.fd_count()} fds > {baseline_fds}"
        await trio.sleep(0.02)


async def test_rejected_certificate_fails_fast_against_the_real_server(
    test_pki: TestPKI, plain_server: ServerProc
) -> None:
    for stem, reason in (
        ("foreign-client", "unknown CA"),
        ("expired-client", "certificate expired"),
    ):
        started = time.monotonic()
        with pytest.raises(ConnectError, match=f"^the server refused our certificate: {reason}$"):
            async with connect(test_pki, plain_server, stem):
                pass
        assert time.monotonic() - started < 2.0
    # accepted by TLS; refused per call (no role)
    async with connect(test_pki, plain_server, "noou-client") as client:
        with pytest.raises(RpcError) as caught:
            await client.list()
    assert (caught.value.code_name, str(caught.value)) == (
        "PERMISSION_DENIED",
        "role none is not allowed to perform operation list_jobs",
    )


async def test_a_request_over_the_message_limit_is_refused_by_the_client_as_an_rpc_error(
    test_pki: TestPKI, plain_server: ServerProc
) -> None:
    async with connect(test_pki, plain_server) as client:
        with pytest.raises(RpcError) as caught:
            await client.create("echo", ["x" * (5 << 20)])
        assert caught.value.code_name == "RESOURCE_EXHAUSTED"
        assert caught.value.message.startswith("request message too large: ")
        assert await client.list() == []  # nothing reached the server
