"""Readers that do not keep up: the job, the other readers and the server's memory must not care.

Issue 7, cases 1 (slow reader) and 2 (never-reading streams that vanish).
"""

from __future__ import annotations

import time

import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import Arena
from tests.integration.attacks.tools import MiB, in_thread

SLOW_OUTPUT = 100 * MiB  # the number; the whole test runs in ~10 s here
SLOW_WINDOW = 16 * 1024  # the slow reader's HTTP/2 stream window
TRICKLE_BYTES = 4096  # ... and the credit it grants per TRICKLE_PERIOD_S: a few KB a second
TRICKLE_PERIOD_S = 1.0
JOB_DEADLINE_S = 30.0  # generous: unblocked, the job takes ~2 s; blocked, it would take hours
MIN_FAST_MB_S = 10.0  # the fast reader's floor (measured ~100+ MB/s through grpcio here)
RSS_BOUND = 50 * MiB  # server RSS growth while 100 MB flow past a stuck reader
NEVER_READERS = 50  # the number
CHATTY_DELAY_S = 0.01  # the chatty job writes 64 KiB every 10 ms (~6 MB/s)
HOLD_S = 2.0  # how long the never-readers stay before vanishing
# What one reader that never reads may cost the server: the engine's live queue (16 chunks of
# 64 KiB) + the connection's outbound buffer (256 KiB queued + 256 KiB being written).
PER_STUCK_STREAM_BOUND = 2 * MiB


async def trickle(conn: tools.RawH2, stream_id: int) -> None:
    """Read the socket, but grant only TRICKLE_BYTES of flow-control credit per period."""
    while not conn.closed:
        with trio.move_on_after(TRICKLE_PERIOD_S):
            while not conn.closed:
                await conn.receive_some()
        if conn.finished(stream_id):
            return
        conn.conn.increment_flow_control_window(TRICKLE_BYTES, stream_id)
        conn.conn.increment_flow_control_window(TRICKLE_BYTES)
        await conn.flush()


async def test_slow_reader_blocks_neither_the_job_nor_a_fast_reader(arena: Arena) -> None:
    """A 100 MB job with two bad readers attached from its first byte: one with a 16 KiB
    window granting 4 KB/s, one advertising a 2 GiB window and never reading its socket.
    The job still ends in seconds, a fast reader gets all 100 MB exactly at full speed, and
    the server's RSS stays far below the output size."""
    peak = tools.PeakRss(arena.srv.pid)
    expected = tools.pattern_sha256(SLOW_OUTPUT)
    async with arena.attack("a slow and a stuck reader on a 100 MB job"):
        slow = await tools.RawH2.connect(
            arena.address, arena.tls(), window=SLOW_WINDOW, auto_ack=False
        )
        stuck = await tools.RawH2.connect(arena.address, arena.tls(), window=2**31 - 1)
        stuck.conn.increment_flow_control_window(2**31 - 1 - 65_535)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peak.run)
                t0 = time.monotonic()
                job = await in_thread(arena.stub.CreateJob, tools.pattern_job(SLOW_OUTPUT))
                slow_id = await slow.request("GetJobsStream", tools.stream_request(job.id))
                await stuck.request("GetJobsStream", tools.stream_request(job.id))
                nursery.start_soon(trickle, slow, slow_id)
                # `stuck` never calls receive: its socket buffers fill and stay full.
                t1 = time.monotonic()
                data = await in_thread(tools.read_stream, arena.stub, job.id)
                fast_s = time.monotonic() - t1
                ended = await in_thread(tools.wait_job_ended, arena.stub, job.id, JOB_DEADLINE_S)
                job_s = time.monotonic() - t0
                nursery.cancel_scope.cancel()
        finally:
            await slow.abort()
            await stuck.abort()
        assert ended.status == "COMPLETED", ended
        assert len(data) == SLOW_OUTPUT
        assert tools.hashlib.sha256(data).hexdigest() == expected
        slow_got = len(slow.streams[slow_id].data)
        assert slow_got < 1 * MiB, f"the slow reader got {slow_got} bytes: not slow"
        fast_mb_s = SLOW_OUTPUT / MiB / fast_s
        assert fast_mb_s >= MIN_FAST_MB_S, f"fast reader at {fast_mb_s:.1f} MB/s"
        growth = peak.peak - arena.resources.rss
        print(
            f"job done in {job_s:.2f} s, fast reader {fast_mb_s:.0f} MB/s, slow reader got "
            f"{slow_got} B, server RSS peak +{growth / MiB:.1f} MiB"
        )
        assert growth < RSS_BOUND, f"server RSS grew {growth / MiB:.1f} MiB"


async def test_never_reading_streams_that_vanish_leave_nothing_behind(arena: Arena) -> None:
    """50 clients (one connection each; half with default windows, half with 2 GiB windows)
    open GetJobsStream on a chatty job and never read; after a while they vanish (TCP RST).
    A well-behaved follower of the same job gets exactly what the server stored."""
    job = await in_thread(arena.stub.CreateJob, tools.pattern_job(-1, CHATTY_DELAY_S))
    peak = tools.PeakRss(arena.srv.pid)
    async with arena.attack(f"{NEVER_READERS} never-reading streams"):
        conns: list[tools.RawH2] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peak.run)
                follower = await _start_follower(nursery, arena, job.id)
                for n in range(NEVER_READERS):
                    huge = n % 2 == 1
                    conn = await tools.RawH2.connect(
                        arena.address, arena.tls(), window=2**31 - 1 if huge else None
                    )
                    if huge:
                        conn.conn.increment_flow_control_window(2**31 - 1 - 65_535)
                    conns.append(conn)
                    await conn.request("GetJobsStream", tools.stream_request(job.id))
                await trio.sleep(HOLD_S)  # the attack's duration, not a synchronisation
                for conn in conns:
                    await conn.abort()
                await in_thread(tools.stop_job, arena.stub, job.id)
                data = await follower.receive()
                nursery.cancel_scope.cancel()
        finally:
            for conn in conns:
                await conn.abort()
    stored = tools.output_file(arena.srv, job.id)
    assert len(stored) > 1 * MiB, "the chatty job wrote too little to prove anything"
    assert data == stored
    assert tools.is_pattern_prefix(stored)
    growth = peak.peak - arena.resources.rss
    print(f"{len(stored)} bytes streamed, server RSS peak +{growth / MiB:.1f} MiB")
    # Unbounded, each 2 GiB-window reader would hold all it was sent (~12 MB here).
    assert growth < NEVER_READERS * PER_STUCK_STREAM_BOUND


async def _start_follower(
    nursery: trio.Nursery, arena: Arena, job_id: str
) -> trio.MemoryReceiveChannel[bytes]:
    """Follow ``job_id`` with grpcio in a thread; its whole output arrives on the channel."""
    send, receive = trio.open_memory_channel[bytes](1)

    async def follow() -> None:
        with send:
            await send.send(await in_thread(tools.read_stream, arena.stub, job_id))

    nursery.start_soon(follow)
    return receive
