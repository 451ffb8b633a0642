"""Holding connections open: idle ones are closed after --idle-timeout, pings are answered,
but neither pings nor a request that never arrives keep a connection (or stream) forever.

Issue 7, case 8. The server runs with ``--idle-timeout 3``. "Idle" means no RPC in
progress (as gRPC's MAX_CONNECTION_IDLE): client PINGs are answered but do not count as
activity, and a stream whose request message never arrives is ended after the same time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import h2.exceptions
import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import IDLE_TIMEOUT_S, Arena, open_arena
from tests.integration.attacks.tools import in_thread, worker_pb2

if TYPE_CHECKING:
    from tests.support import TestPKI

IDLE_CONNECTIONS = 20
CLOSE_SLACK_S = 3.0  # closed within idle timeout + this
EARLY_FACTOR = 0.8  # and not before this fraction of it
PINGS = 10
PING_PERIOD_S = 0.5
PING_ANSWER_S = 1.0


async def _idle(arena: Arena, closed_after: list[float], goaway: list[bool]) -> None:
    conn = await tools.RawH2.connect(arena.address, arena.tls())
    try:
        t0 = time.monotonic()
        await conn.until_closed(IDLE_TIMEOUT_S + CLOSE_SLACK_S)
        closed_after.append(time.monotonic() - t0)
        goaway.append(conn.goaway is not None)
    finally:
        await conn.aclose()


async def test_idle_connections_are_closed_after_the_idle_timeout(arena: Arena) -> None:
    """20 connections that complete TLS + HTTP/2 and then do nothing: each gets GOAWAY and
    is closed after about --idle-timeout; the probe's own busy connection stays up."""
    closed_after: list[float] = []
    goaway: list[bool] = []
    attack = arena.attack(f"{IDLE_CONNECTIONS} idle connections")
    async with attack, trio.open_nursery() as nursery:
        for _ in range(IDLE_CONNECTIONS):
            nursery.start_soon(_idle, arena, closed_after, goaway)
    assert len(closed_after) == IDLE_CONNECTIONS
    assert min(closed_after) >= EARLY_FACTOR * IDLE_TIMEOUT_S, min(closed_after)
    assert all(goaway), "an idle connection was closed without GOAWAY"
    print(f"idle connections closed after {min(closed_after):.2f}..{max(closed_after):.2f} s")


async def test_client_pings_are_answered_but_do_not_defeat_the_idle_timeout(
    arena: Arena,
) -> None:
    """A connection that sends HTTP/2 PINGs every 0.5 s and nothing else: every PING is
    acknowledged with its own payload within 1 s, and the connection is still closed as
    idle after --idle-timeout."""
    async with arena.attack("a pinging idle connection"):
        conn = await tools.RawH2.connect(arena.address, arena.tls())
        try:
            t0 = time.monotonic()
            answered = 0
            for n in range(PINGS):
                payload = os.urandom(8)
                try:
                    conn.conn.ping(payload)
                    await conn.flush()
                except (h2.exceptions.ProtocolError, trio.BrokenResourceError):
                    break  # the server has just closed the connection as idle
                sent = time.monotonic()
                with trio.move_on_after(PING_ANSWER_S) as scope:
                    while payload not in conn.pings_acked and not conn.closed:
                        await conn.receive_some()
                if conn.closed:
                    break
                assert not scope.cancelled_caught, f"PING {n} not answered in {PING_ANSWER_S}s"
                answered += 1
                await trio.sleep(max(0.0, PING_PERIOD_S - (time.monotonic() - sent)))
            await conn.until_closed(IDLE_TIMEOUT_S + CLOSE_SLACK_S)
            closed_after = time.monotonic() - t0
        finally:
            await conn.aclose()
    assert answered >= int(IDLE_TIMEOUT_S * EARLY_FACTOR / PING_PERIOD_S), answered
    assert EARLY_FACTOR * IDLE_TIMEOUT_S <= closed_after <= IDLE_TIMEOUT_S + CLOSE_SLACK_S
    print(f"{answered} pings answered; closed as idle after {closed_after:.2f} s")


async def test_a_stream_whose_request_never_arrives_is_ended(arena: Arena) -> None:
    """HEADERS for GetJob, then nothing (no request message, no END_STREAM): the server ends
    that stream (an error status or a reset) after about the idle timeout instead of waiting
    forever, and then closes the now idle connection."""
    async with arena.attack("a stream stalled before its request"):
        conn = await tools.RawH2.connect(arena.address, arena.tls())
        try:
            t0 = time.monotonic()
            stream_id = conn.start_request("GetJob", None)
            await conn.flush()
            await conn.until(
                lambda: conn.finished(stream_id), timeout=IDLE_TIMEOUT_S + CLOSE_SLACK_S
            )
            ended_after = time.monotonic() - t0
            state = conn.streams[stream_id]
            assert state.reset is not None or state.grpc_status not in (None, 0), state
        finally:
            await conn.aclose()
    assert ended_after >= EARLY_FACTOR * IDLE_TIMEOUT_S
    print(f"stalled request ended after {ended_after:.2f} s with {state.grpc_status}")


async def test_a_quiet_stream_is_not_idle(arena: Arena) -> None:
    """A stream following a job that stays silent for longer than the idle timeout is an RPC
    in progress: the connection is not closed, and the stream gets the late output."""
    job = await in_thread(
        arena.stub.CreateJob,
        worker_pb2.CreateJobReq(
            command="/bin/sh", args=["-c", f"sleep {IDLE_TIMEOUT_S + 1.5}; echo late"]
        ),
    )
    with tools.grpc_stub(arena.address, arena.test_pki) as stub:
        data = await in_thread(tools.read_stream, stub, job.id, 30)
    assert data == b"late\n"
    ended = await in_thread(tools.wait_job_ended, arena.stub, job.id)
    assert ended.status == "COMPLETED"


PING_FLOOD_FRAMES = 200_000  # 3.4 MB of PING frames: ~3.4 MB of ACKs owed if all were read
RX_SETTLE_S = 1.5


def _server_rx_queue(server_port: int, client_port: int) -> int | None:
    """Bytes waiting unread in the server's socket of this connection (/proc/net/tcp)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:  # noqa: SIM115
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port
        ):
            return int(fields[4].split(":")[1], 16)
    return None


def test_a_ping_flood_that_never_reads_is_throttled_not_buffered(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    """A client floods PINGs and never reads the ACKs. The server must stop reading once it
    owes too much (TCP backpressure on the attacker) instead of queueing ACKs without bound
    (measured before: +31 MiB of server memory for 2 million PINGs, linear).

    Proof: after the flood, bytes stay unread in the server's socket for as long as the
    attacker does not read; a server that keeps reading drains them to zero."""
    # With the PING-rate check off: a flooder is otherwise sent away at its third PING
    # (test_keepalive), and what is proven here is the backpressure beneath that check.
    flags = ("--idle-timeout", "60", "--keepalive-min-ping-interval", "0")
    with open_arena(test_pki, tmp_path, *flags) as arena:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: keep it small
        raw.connect((arena.srv.host, arena.srv.port))
        client_port = raw.getsockname()[1]
        tls = tools.client_ssl_context(test_pki).wrap_socket(raw, server_hostname="localhost")
        tls.settimeout(10)
        try:
            settings = struct.pack(">I", 0)[1:] + b"\x04\x00" + b"\x00\x00\x00\x00"
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
            ping = struct.pack(">I", 8)[1:] + b"\x06\x00" + b"\x00\x00\x00\x00" + b"12345678"
            batch = ping * 1000
            with contextlib.suppress(TimeoutError):  # blocked: the server stopped reading
                for _ in range(PING_FLOOD_FRAMES // 1000):
                    tls.sendall(batch)
            time.sleep(RX_SETTLE_S)  # a server that reads on would drain its queue meanwhile
            unread = _server_rx_queue(arena.srv.port, client_port)
            assert unread is not None, "the connection is gone"
            assert unread > 0, "the server read everything it was sent"
            assert tools.rss_bytes(arena.srv.pid) < arena.resources.rss + 20 * 1024 * 1024
        finally:
            raw.close()
