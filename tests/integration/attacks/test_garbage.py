"""Garbage on the wire: the connection is closed, the server logs one line, nothing else changes.

Issue 7, case 5: random bytes, an HTTP/1.1 request and a plaintext HTTP/2 preface on the TLS
port; a valid TLS session that then sends a malformed HTTP/2 frame; a gRPC message whose
length prefix lies. Each kind runs 20 times in a row (so a per-connection leak shows in the
fd count) while the well-behaved probe runs.
"""

from __future__ import annotations

import os
import time

import h2.errors
import pytest

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import HANDSHAKE_TIMEOUT_S, Arena
from tests.integration.attacks.tools import in_thread

REPEAT = 20
MAX_CONNECTIONS = 500  # a bound on the loop while waiting for the probe
CLOSE_DEADLINE_S = HANDSHAKE_TIMEOUT_S + 4.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, SETTINGS, no flags, stream 0
# A SETTINGS frame whose length (5) is not a multiple of 6: a connection error (RFC 7540 6.5).
BAD_SETTINGS = b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5
# A DATA frame on stream 0: a connection error (RFC 7540 6.1).
DATA_ON_STREAM_0 = b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"abcd"

PLAINTEXT = {
    "random_bytes": os.urandom(4096),
    "http1_request": b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
    "plaintext_h2_preface": H2_PREFACE + EMPTY_SETTINGS,
}
MALFORMED_FRAMES = {"bad_settings_length": BAD_SETTINGS, "data_on_stream_0": DATA_ON_STREAM_0}


async def _plaintext(arena: Arena, payload: bytes) -> None:
    stream = await tools.open_tcp(arena.address)
    try:
        await stream.send_all(payload)
        await tools.wait_closed_by_peer(stream, CLOSE_DEADLINE_S)
    finally:
        await stream.aclose()


async def _malformed_frame(arena: Arena, frame: bytes) -> None:
    conn = await tools.RawH2.connect(arena.address, arena.tls())
    try:
        await conn.until(lambda: bool(conn.remote_settings))  # the server's SETTINGS arrived
        await conn.stream.send_all(frame)  # raw bytes, past h2's own checks
        await conn.until_closed(CLOSE_DEADLINE_S)
        assert conn.goaway is not None, "closed without GOAWAY"
        assert conn.goaway.error_code != h2.errors.ErrorCodes.NO_ERROR
    finally:
        await conn.aclose()


async def _lying_length_prefix(arena: Arena) -> None:
    """GetJob whose 5-byte prefix announces 1000 bytes, then 12 bytes and END_STREAM."""
    conn = await tools.RawH2.connect(arena.address, arena.tls())
    try:
        body = tools.get_job_request(arena.job_id)[5:]
        stream_id = await conn.request("GetJob", tools.grpc_frame(body, declared=1000))
        await conn.until(lambda: conn.finished(stream_id), timeout=CLOSE_DEADLINE_S)
        state = conn.streams[stream_id]
        assert state.reset is not None or state.grpc_status not in (None, 0), state
        assert not state.messages(), "answered a request it never received whole"
    finally:
        await conn.aclose()


async def _run(arena: Arena, kind: str, loop: tools.ProbeLoop) -> int:
    """Send ``kind`` on REPEAT connections (more if needed until the probe ran a few times,
    at most MAX_CONNECTIONS); return how many connections were used."""
    count = 0
    while count < REPEAT or len(loop.samples) < tools.MIN_PROBES_DURING:
        if count >= MAX_CONNECTIONS:
            break
        count += 1
        if kind in PLAINTEXT:
            await _plaintext(arena, PLAINTEXT[kind])
        elif kind in MALFORMED_FRAMES:
            await _malformed_frame(arena, MALFORMED_FRAMES[kind])
        else:
            await _lying_length_prefix(arena)
    return count


@pytest.mark.parametrize("kind", [*PLAINTEXT, *MALFORMED_FRAMES, "grpc_lying_length_prefix"])
async def test_garbage_closes_the_connection_with_one_log_line(arena: Arena, kind: str) -> None:
    """Each garbage connection ends promptly with exactly one server log line (no
    traceback), the job list is unchanged, and the probe is unaffected."""
    jobs_before = await in_thread(arena.stub.GetJobs, tools.worker_pb2.EmptyRequest())
    before = arena.log_offset()
    async with arena.attack(f"garbage: {kind}") as loop:
        connections = await _run(arena, kind, loop)
    jobs_after = await in_thread(arena.stub.GetJobs, tools.worker_pb2.EmptyRequest())
    assert jobs_after == jobs_before
    garbage_lines = await in_thread(_garbage_lines, arena, before, connections)
    assert len(garbage_lines) == connections, "\n".join(garbage_lines[:10])
    assert not any("Traceback" in line for line in garbage_lines)
    print(f"{kind}: {len(garbage_lines)} log lines for {connections} connections")


def _garbage_lines(arena: Arena, offset: int, expected: int) -> list[str]:
    """The log lines after ``offset`` that the probe did not cause (its calls log
    ``outcome=OK``), polled until ``expected`` of them appeared or 5 s passed."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line
            for line in tools.log_lines_since(arena.srv, offset)
            if line.strip() and "outcome=OK" not in line
        ]
        if len(lines) >= expected or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)
