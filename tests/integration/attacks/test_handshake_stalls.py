"""TLS handshakes that never finish: dropped after --handshake-timeout, nobody else waits.

Issue 7, case 4: 200 TCP connections that never send a ClientHello and 50 that send half
of one, at the same time, against a server with ``--handshake-timeout 1``. Meanwhile a
well-behaved client opens a NEW connection (full TLS handshake) for every probe.
"""

from __future__ import annotations

import time

import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import HANDSHAKE_TIMEOUT_S, Arena

SILENT = 200  # the numbers
HALF_HELLO = 50
DROP_SLACK_S = 4.0  # dropped within handshake timeout + this (loaded 2-core box)


async def _stall(arena: Arena, payload: bytes, closed_after: list[float]) -> None:
    # Timed from before the connect: the server's timer starts at its accept, which comes
    # after, so a drop can never look early however late this task resumes (with 250 of
    # them on one loop, a connect's return can lag the accept by a good part of a second).
    started = time.monotonic()
    stream = await tools.open_tcp(arena.address)
    try:
        if payload:
            await stream.send_all(payload)
        await tools.wait_closed_by_peer(stream, HANDSHAKE_TIMEOUT_S + DROP_SLACK_S)
        closed_after.append(time.monotonic() - started)
    finally:
        await stream.aclose()


async def test_stalled_handshakes_are_dropped_and_new_clients_connect(arena: Arena) -> None:
    """Every stalled connection is closed by the server after about the handshake timeout
    (not before it, not much after), each with one log line, while new clients connect
    and are served as fast as before."""
    hello = tools.client_hello(arena.test_pki)
    assert len(hello) > 100, "not a ClientHello"
    half = hello[: len(hello) // 2]
    silent_closed: list[float] = []
    half_closed: list[float] = []
    before = arena.log_offset()
    t0 = time.monotonic()
    attack = arena.attack(f"{SILENT} silent + {HALF_HELLO} half-hello connections", fresh=True)
    async with attack, trio.open_nursery() as nursery:
        for _ in range(SILENT):
            nursery.start_soon(_stall, arena, b"", silent_closed)
        for _ in range(HALF_HELLO):
            nursery.start_soon(_stall, arena, half, half_closed)
    elapsed = time.monotonic() - t0
    assert len(silent_closed) == SILENT
    assert len(half_closed) == HALF_HELLO
    every = silent_closed + half_closed
    # Not before the timeout (0.95: timer granularity), not long after it.
    assert min(every) >= 0.95 * HANDSHAKE_TIMEOUT_S, f"dropped early: {min(every):.2f} s"
    assert max(every) <= HANDSHAKE_TIMEOUT_S + DROP_SLACK_S
    lines = [
        line for line in tools.log_lines_since(arena.srv, before) if "handshake" in line.lower()
    ]
    assert len(lines) >= SILENT + HALF_HELLO, f"{len(lines)} handshake log lines"
    assert "Traceback" not in arena.srv.log_text()[before:]
    print(f"stalls dropped after {min(every):.2f}..{max(every):.2f} s; attack took {elapsed:.1f} s")
