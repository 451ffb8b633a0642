"""Floods: many streams on one connection, many connections at once. The server applies its
limits and refuses the excess cleanly instead of slowing everyone down.

Issue 7, case 7: one connection opening 1,000 concurrent streams (server started with
``--max-concurrent-streams 50``); 500 connections at once (``--max-connections 100``).
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import h2.errors
import h2.settings
import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import open_arena
from tests.integration.attacks.tools import in_thread, worker_pb2

if TYPE_CHECKING:
    from tests.conftest import TestPKI

STREAM_LIMIT = 50
STREAMS = 1000  # the number
CONNECTION_LIMIT = 100
CONNECTIONS = 500  # the number
PING_DATA = b"floodend"
SILENT_JOB = worker_pb2.CreateJobReq(command="/bin/sleep", args=["60"])


async def test_1000_streams_on_one_connection_are_limited(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    """The server advertises MAX_CONCURRENT_STREAMS 50; a client ignoring it and opening
    1,000 GetJobsStream streams (on a silent job: they stay open) gets at most 50 served
    and the rest refused (RST_STREAM REFUSED_STREAM, or the connection ended with GOAWAY)."""
    with open_arena(test_pki, tmp_path, "--max-concurrent-streams", str(STREAM_LIMIT)) as arena:
        job = await in_thread(arena.stub.CreateJob, SILENT_JOB)
        async with arena.attack(f"{STREAMS} streams on one connection"):
            conn = await tools.RawH2.connect(arena.address, arena.tls())
            try:
                await conn.until(lambda: bool(conn.remote_settings))
                advertised = conn.remote_settings.get(
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                )
                assert advertised == STREAM_LIMIT
                conn.ignore_stream_limit()
                ids = []
                for n in range(STREAMS):
                    ids.append(conn.start_request("GetJobsStream", tools.stream_request(job.id)))
                    if n % 100 == 99:
                        await conn.flush()
                await conn.flush()
                # The server handles frames in order: once it acknowledged a PING sent after
                # the last HEADERS, every refusal (RST_STREAM) has been sent before the ACK.
                conn.conn.ping(PING_DATA)
                await conn.flush()
                await conn.until(lambda: PING_DATA in conn.pings_acked, timeout=15)
                refused = Counter(conn.streams[i].reset for i in ids if conn.streams[i].reset)
                served = [i for i in ids if conn.streams[i].reset is None]
                print(f"{len(served)} served, refused: {dict(refused)}, goaway: {conn.goaway}")
                # The silent job still runs, so no served stream ended and freed its slot.
                now = await in_thread(arena.stub.GetJob, worker_pb2.GetJobReq(id=job.id))
                assert now.status == "RUNNING", f"the silent job ended: {now}"
                assert len(served) <= STREAM_LIMIT
                if conn.goaway is None:
                    assert refused[h2.errors.ErrorCodes.REFUSED_STREAM] >= STREAMS - STREAM_LIMIT
            finally:
                await conn.abort()
            # Before the fd count is compared: the job's own pipe and cgroup files go too.
            await in_thread(tools.stop_job, arena.stub, job.id)


async def _connect_and_call(
    address: str, context: ssl.SSLContext, job_id: str, outcomes: Counter[str], hold: trio.Event
) -> None:
    """One flood connection: TLS, HTTP/2, one GetJob; then hold the connection until ``hold``."""
    try:
        conn = await tools.RawH2.connect(address, context, timeout=15)
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        outcomes[f"refused at handshake ({type(exc).__name__})"] += 1
        return
    try:
        stream_id = await conn.request("GetJob", tools.get_job_request(job_id))
        with trio.move_on_after(15):
            await conn.until(lambda: conn.finished(stream_id) or conn.closed, timeout=15)
        if conn.finished(stream_id) and conn.streams[stream_id].grpc_status == 0:
            outcomes["served"] += 1
            await hold.wait()
        else:
            outcomes["closed before an answer"] += 1
    except (OSError, trio.BrokenResourceError, AssertionError):
        outcomes["closed before an answer"] += 1
    finally:
        await conn.aclose()


async def test_500_connections_at_once_are_limited(test_pki: TestPKI, tmp_path: Path) -> None:
    """500 connections at once against --max-connections 100: at most 100 are served (the
    probe holds one), the excess is closed at accept with a log line, the probe's calls keep
    their latency, and once the flood leaves new clients connect again."""
    extra = ("--max-connections", str(CONNECTION_LIMIT))
    with open_arena(test_pki, tmp_path, *extra) as arena:
        before = arena.log_offset()
        outcomes: Counter[str] = Counter()
        async with arena.attack(f"{CONNECTIONS} connections at once"):
            hold = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(CONNECTIONS):
                    nursery.start_soon(
                        _connect_and_call, arena.address, arena.tls(), arena.job_id, outcomes, hold
                    )
                # Served connections count themselves before holding on: once all 500 have
                # reported, the served ones are still open, side by side.
                with trio.fail_after(30):
                    while sum(outcomes.values()) < CONNECTIONS:
                        await trio.sleep(0.05)  # polling a counter, with a deadline
                hold.set()
        print(f"{CONNECTIONS} connections: {dict(outcomes)}")
        assert outcomes["served"] <= CONNECTION_LIMIT
        assert outcomes["served"] >= CONNECTION_LIMIT // 2, "the limit refused far too much"
        assert sum(outcomes.values()) == CONNECTIONS
        refusal = f"connection limit ({CONNECTION_LIMIT}) reached: refused"
        deadline = time.monotonic() + 10  # log lines are written by a thread, a bit later
        while refusal not in (new_log := arena.srv.log_text()[before:]):
            if time.monotonic() > deadline:
                break
            await trio.sleep(0.02)  # polling the log file, with a deadline
        assert refusal in new_log, new_log[-2000:]
        assert "Traceback" not in new_log
        # After the flood: new connections are served again.
        assert tools.Probe(arena.address, test_pki, arena.job_id, fresh=True).once().error is None
