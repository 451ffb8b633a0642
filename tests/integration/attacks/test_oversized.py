"""Oversized requests: refused on that stream, without the server buffering the body.

Issue 7, case 6: a CreateJob of 8 MB (args) through grpcio, and a raw request whose gRPC
length prefix declares a 2 GB message followed by as much body as flow control lets through.
"""

from __future__ import annotations

import grpc
import pytest
import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import Arena
from tests.integration.attacks.tools import MiB, in_thread, worker_pb2

REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
REFUSED_CODES = {8, 3}  # RESOURCE_EXHAUSTED, INVALID_ARGUMENT on the wire
BIG_ARGS = 8 * MiB  # the number
DECLARED = 2 * 1024 * MiB  # 2 GB announced in the length prefix
SEND_CAP = 64 * MiB  # the attacker gives up after this much body (a server that reads it all)
# The body a client may push before the refusal reaches it: the server's initial stream window
# (max message + 5 bytes). More means the server granted window for a refused message.
ACCEPTED_BOUND = 4 * MiB + 64 * 1024
RSS_BOUND = 20 * MiB
MIN_ATTEMPTS = 3
MAX_ATTEMPTS = 200  # bounds the loop while waiting for the probe


async def test_8mb_create_job_is_refused_and_the_connection_lives(arena: Arena) -> None:
    """CreateJob with 8 MB of args: RESOURCE_EXHAUSTED (or INVALID_ARGUMENT), server RSS
    barely moves, and the same channel keeps working right after."""
    request = worker_pb2.CreateJobReq(command="/bin/echo", args=["x" * (BIG_ARGS // 8)] * 8)
    assert request.ByteSize() >= BIG_ARGS
    peak = tools.PeakRss(arena.srv.pid)
    async with arena.attack("an 8 MB CreateJob"), trio.open_nursery() as nursery:
        nursery.start_soon(peak.run)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                await in_thread(arena.stub.CreateJob, request, timeout=10)
            code, details = refused.value.code(), refused.value.details()
            assert code in REFUSED, (code, details)
            assert "Traceback" not in (details or "")
            job = await in_thread(
                arena.stub.GetJob, worker_pb2.GetJobReq(id=arena.job_id), timeout=5
            )
            assert job.status == "COMPLETED"
        nursery.cancel_scope.cancel()
    jobs = await in_thread(arena.stub.GetJobs, worker_pb2.EmptyRequest())
    assert [j.id for j in jobs.jobs] == [arena.job_id], "a job was created"
    growth = peak.peak - arena.resources.rss
    print(f"8 MB CreateJob x3: server RSS peak +{growth / MiB:.1f} MiB")
    assert growth < RSS_BOUND


async def _send_what_flow_control_allows(conn: tools.RawH2, stream_id: int) -> int:
    """Push body bytes as fast as the server's windows allow, until the stream is refused,
    the connection closes or SEND_CAP is reached. Returns how much the server accepted."""
    sent = 0
    block = b"\0" * 16384
    with trio.move_on_after(10):
        while sent < SEND_CAP and not conn.finished(stream_id) and not conn.closed:
            window = min(
                conn.conn.local_flow_control_window(stream_id), conn.conn.max_outbound_frame_size
            )
            if window <= 0:
                await conn.receive_some()  # wait for WINDOW_UPDATE (or the refusal)
                continue
            conn.send_data(stream_id, block[:window])
            await conn.flush()
            sent += window
    return sent


async def test_declared_2gb_message_is_refused_without_buffering(arena: Arena) -> None:
    """GetJob streams announcing a 2 GB message (one after the other on one connection,
    until the probe ran a few times): each is refused (RESOURCE_EXHAUSTED trailers or a
    reset) having accepted at most a few MiB of body, the server's RSS stays flat, and the
    same connection still serves a normal call."""
    peak = tools.PeakRss(arena.srv.pid)
    attempts = 0
    async with arena.attack("requests declaring 2 GB") as loop:
        conn = await tools.RawH2.connect(arena.address, arena.tls())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peak.run)
                while attempts < MIN_ATTEMPTS or len(loop.samples) < tools.MIN_PROBES_DURING:
                    assert attempts < MAX_ATTEMPTS, "the probe did not run"
                    attempts += 1
                    stream_id = conn.start_request("GetJob", None)
                    conn.send_data(stream_id, tools.grpc_frame(b"", declared=DECLARED))
                    await conn.flush()
                    accepted = await _send_what_flow_control_allows(conn, stream_id)
                    await conn.until(lambda: conn.finished(stream_id), timeout=5)  # noqa: B023
                    state = conn.streams[stream_id]
                    assert state.grpc_status in REFUSED_CODES or state.reset is not None, state
                    assert not conn.closed, "the whole connection died for one bad stream"
                    assert accepted <= ACCEPTED_BOUND, f"server took in {accepted} body bytes"
                ok_id = await conn.request("GetJob", tools.get_job_request(arena.job_id))
                await conn.until(lambda: conn.finished(ok_id))
                assert conn.streams[ok_id].grpc_status == 0
                reply = worker_pb2.GetJobRes.FromString(conn.streams[ok_id].messages()[0])
                assert reply.id == arena.job_id
                nursery.cancel_scope.cancel()
        finally:
            await conn.aclose()
    growth = peak.peak - arena.resources.rss
    print(
        f"2 GB declared x{attempts}: refused with status {state.grpc_status} / reset "
        f"{state.reset} after {accepted} body bytes; server RSS peak +{growth / MiB:.1f} MiB"
    )
    assert growth < RSS_BOUND
