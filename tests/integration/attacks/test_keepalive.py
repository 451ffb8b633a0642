"""HTTP/2 keepalive: a peer that stops answering is dropped after keepalive-time +
keepalive-timeout, even with a stream blocked on flow control; a peer that answers stays;
a client flooding PINGs gets GOAWAY ENHANCE_YOUR_CALM ("too_many_pings")."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h2.errors
import pytest
import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import Arena, open_arena
from tests.integration.attacks.tools import in_thread

if TYPE_CHECKING:
    from tests.support import TestPKI

KEEPALIVE_TIME_S = 0.5
KEEPALIVE_TIMEOUT_S = 0.5
SLACK_S = 3.0  # a correctness bound for a loaded machine, not a timing measurement
PING_FLOOD_PERIOD_S = 0.01


@pytest.fixture
def keepalive_arena(test_pki: TestPKI, tmp_path: Path) -> Iterator[Arena]:
    flags = (
        "--keepalive-time", str(KEEPALIVE_TIME_S),
        "--keepalive-timeout", str(KEEPALIVE_TIMEOUT_S),
        "--idle-timeout", "60",  # keepalive, not idleness, must be what closes
    )  # fmt: skip
    with open_arena(test_pki, tmp_path, *flags) as arena:
        yield arena


async def test_a_silent_peer_with_a_blocked_stream_is_dropped_after_time_and_timeout(
    keepalive_arena: Arena,
) -> None:
    """The peer opens a stream of a job's output, takes no data (no flow-control credit) and
    then answers nothing: the server PINGs it after keepalive-time and closes it once the
    PING went unanswered for keepalive-timeout, instead of holding the stream for as long
    as TCP would (minutes)."""
    arena = keepalive_arena
    offset = len(arena.srv.log_text())
    conn = await tools.RawH2.connect(arena.address, arena.tls(), window=1, auto_ack=False)
    try:
        t0 = time.monotonic()
        await conn.request("GetJobsStream", tools.stream_request(arena.job_id))
        # From here on nothing is read: the server's PING stays unanswered.
        await in_thread(
            arena.srv.wait_for_log,
            "no answer to a keepalive PING within",
            KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S + SLACK_S,
        )
        dropped_after = time.monotonic() - t0
        await conn.until_closed(SLACK_S)  # reading now: the server has closed it
    finally:
        await conn.aclose()
    assert dropped_after >= KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S - 0.1, dropped_after
    lines = [line for line in tools.log_lines_since(arena.srv, offset) if "keepalive" in line]
    assert len(lines) == 1, lines


async def test_a_peer_that_answers_stays_connected(keepalive_arena: Arena) -> None:
    arena = keepalive_arena
    conn = await tools.RawH2.connect(arena.address, arena.tls())
    try:
        # Several keepalive periods, reading (and so answering PINGs) all along.
        with trio.move_on_after(4 * (KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S)):
            while not conn.closed:
                await conn.receive_some()
        assert not conn.closed
        assert conn.pings_received >= 2
        stream_id = await conn.request("GetJob", tools.get_job_request(arena.job_id))
        await conn.until(lambda: conn.finished(stream_id))
        assert conn.streams[stream_id].trailers.get("grpc-status") == "0"
    finally:
        await conn.aclose()


async def test_a_client_pinging_every_10_ms_gets_goaway_enhance_your_calm(arena: Arena) -> None:
    conn = await tools.RawH2.connect(arena.address, arena.tls())
    try:
        with trio.fail_after(10):
            while conn.goaway is None and not conn.closed:
                conn.conn.ping(b"floodme!")
                try:
                    await conn.flush()
                except (trio.BrokenResourceError, ssl.SSLError):
                    break  # the server closed the connection under our write
                with trio.move_on_after(PING_FLOOD_PERIOD_S):
                    await conn.receive_some()
            await conn.until_closed(SLACK_S)
    finally:
        await conn.aclose()
    # The server serves everyone else as before.
    assert (await in_thread(arena.stub.GetJob, tools.worker_pb2.GetJobReq(id=arena.job_id))).id
    assert conn.goaway is not None
    assert conn.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert conn.goaway.additional_data == b"too_many_pings"
    # The first PING and two strikes were answered, and the third strike too (h2 answers a
    # PING as it reads it) just before the GOAWAY.
    assert len(conn.pings_acked) <= 4
