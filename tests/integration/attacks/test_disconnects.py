"""Clients that vanish mid-output: no handler, task or file handle may stay behind.

Issue 7, case 3: 200 streams killed mid-output, by TCP reset (150: 30 connections x 5
streams, closed with SO_LINGER 0) and by killing the client process (50: 5 grpcio processes
x 10 streams, SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import Arena
from tests.integration.attacks.tools import MiB, in_thread

RESET_CONNECTIONS = 30
STREAMS_PER_CONNECTION = 5
KILLED_PROCESSES = 5
STREAMS_PER_PROCESS = 10
KILLED_STREAMS = (
    RESET_CONNECTIONS * STREAMS_PER_CONNECTION + KILLED_PROCESSES * STREAMS_PER_PROCESS
)  # 200, the number
CHATTY_DELAY_S = 0.01
RESET_WINDOW = 16 * 1024  # what each reset stream may receive: mid-output, cheaply
READY_TIMEOUT_S = 20.0  # a cold grpcio process, 10 streams: ~1 s; slack for a loaded CI box

# A grpcio client process: opens N streams on the job, prints "ready" once each got output,
# then waits to be killed (bounded: it exits by itself after a minute).
CLIENT_SCRIPT = """
import sys, threading, grpc
from jobworker.api import worker_pb2, worker_pb2_grpc
address, ca, cert, key, job_id, count = sys.argv[1:7]
creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                     open(cert, "rb").read())
stub = worker_pb2_grpc.JobServiceStub(grpc.secure_channel(address, creds))
got = threading.Semaphore(0)
def follow():
    stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=60)
    next(stream)
    got.release()  # then never read again: the stream sits at its flow-control window
for _ in range(int(count)):
    threading.Thread(target=follow, daemon=True).start()
for _ in range(int(count)):
    got.acquire()
print("ready", flush=True)
threading.Event().wait(60)
"""


async def _reset_mid_output(arena: Arena, job_id: str) -> None:
    """5 streams on one connection, each stopped by flow control after its first bytes
    (16 KiB windows, never acknowledged), then the connection is reset."""
    conn = await tools.RawH2.connect(
        arena.address, arena.tls(), window=RESET_WINDOW, auto_ack=False
    )
    conn.conn.increment_flow_control_window(STREAMS_PER_CONNECTION * RESET_WINDOW)
    try:
        ids = [
            await conn.request("GetJobsStream", tools.stream_request(job_id))
            for _ in range(STREAMS_PER_CONNECTION)
        ]
        await conn.until(lambda: all(conn.streams[i].data for i in ids), timeout=10)
    finally:
        await conn.abort()


async def _killed_mid_output(arena: Arena, job_id: str) -> None:
    pki = arena.test_pki
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            arena.address,
            str(pki.ca_cert),
            str(pki.cert("admin-client")),
            str(pki.key("admin-client")),
            job_id,
            str(STREAMS_PER_PROCESS),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(READY_TIMEOUT_S):
            while b"ready" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"client process exited early ({await proc.wait()})"
                out += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        with trio.move_on_after(5, shield=True):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_streams_killed_mid_output_release_everything(arena: Arena) -> None:
    """200 streams of a chatty job die mid-output (TCP RST / SIGKILL of the client). Every
    handler ends (its audit line says CANCELLED), fds and RSS return to baseline, and a
    well-behaved follower still gets exactly the stored output."""
    job = await in_thread(arena.stub.CreateJob, tools.pattern_job(-1, CHATTY_DELAY_S))
    before = arena.log_offset()
    follower_send, follower = trio.open_memory_channel[bytes](1)
    attack = arena.attack(f"{KILLED_STREAMS} streams killed mid-output")
    async with attack, trio.open_nursery() as nursery:

        async def follow() -> None:
            with follower_send:
                data = await in_thread(tools.read_stream, arena.stub, job.id)
                await follower_send.send(data)

        nursery.start_soon(follow)
        async with trio.open_nursery() as attackers:
            for _ in range(RESET_CONNECTIONS):
                attackers.start_soon(_reset_mid_output, arena, job.id)
            for _ in range(KILLED_PROCESSES):
                attackers.start_soon(_killed_mid_output, arena, job.id)
        # Every killed stream's handler ends and writes its audit line.
        await in_thread(
            arena.srv.wait_for_log,
            rf"method=GetJobsStream .*job={job.id} outcome=CANCELLED",
            10.0,
            KILLED_STREAMS,
        )
        await in_thread(tools.stop_job, arena.stub, job.id)
        data = await follower.receive()
    stored = tools.output_file(arena.srv, job.id)
    assert len(stored) > 1 * MiB
    assert data == stored
    assert tools.is_pattern_prefix(stored)
    new_log = arena.srv.log_text()[before:]
    assert "Traceback" not in new_log
    assert os.path.exists(f"/proc/{arena.srv.pid}")
