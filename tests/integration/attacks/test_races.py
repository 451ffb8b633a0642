"""Racing the job: streams opened as it exits, stops racing its natural exit, concurrent stops.

Issue 7, case 9. The chosen semantics for concurrent stops: every StopJob that arrives
while the job is still running waits for the one stop in progress and returns the same
final STOPPED record; a StopJob that arrives after the job ended gets FAILED_PRECONDITION
``job is not running: <id> (current status: <STATUS>)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import trio
from hyperframe.frame import RstStreamFrame, WindowUpdateFrame

from tests.integration.attacks import tools
from tests.integration.attacks.conftest import Arena, open_arena
from tests.integration.attacks.tools import in_thread, worker_pb2
from tests.support import JOB_PYTHON

if TYPE_CHECKING:
    from tests.conftest import TestPKI

RACE_JOBS = 10
RACE_OUTPUT = 256 * 1024
STREAM_OFFSETS_MS = (0, 1, 2, 3, 5, 8, 12, 17, 23, 30, 40, 55, 75, 100, 150, 250)
STOP_JOBS = 20
LATE_FRAME_ROUNDS = 20
MAX_ROUNDS = 10  # bounds the rounds while waiting for the probe
STOP_SLEEP_S = 0.05  # each job exits by itself after this long ...
STOP_DELAYS_MS = tuple(range(0, 100, 5))  # ... and a StopJob arrives this long after create
CONCURRENT_STOPS = 20  # the number
STOP_GRACE_S = 1.0  # the TERM-ignoring job keeps running this long: every stop arrives meanwhile
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def _wait_ready(stub: tools.worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    """Wait until the job printed 'ready' (it ignores SIGTERM from then on)."""
    stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=10)
    try:
        assert next(stream).payload == b"ready\n"
    finally:
        stream.cancel()


async def _stream_at(arena: Arena, job_id: str, delay_ms: int, results: list[bytes]) -> None:
    await trio.sleep(delay_ms / 1000)  # the race's offset, not a synchronisation
    results.append(await in_thread(tools.read_stream, arena.stub, job_id, 20))


async def test_streams_opened_as_the_job_exits_get_every_byte(arena: Arena) -> None:
    """10 short jobs (256 KiB, then exit); for each, 16 streams opened from the moment of
    creation to well after the exit (0..250 ms). Every stream ends and has every byte."""
    expected = tools.pattern(RACE_OUTPUT)
    results: list[bytes] = []
    async with arena.attack(f"{RACE_JOBS * len(STREAM_OFFSETS_MS)} streams racing job exits"):
        for _ in range(RACE_JOBS):
            job = await in_thread(arena.stub.CreateJob, tools.pattern_job(RACE_OUTPUT))
            async with trio.open_nursery() as nursery:
                for delay in STREAM_OFFSETS_MS:
                    nursery.start_soon(_stream_at, arena, job.id, delay, results)
            ended = await in_thread(tools.wait_job_ended, arena.stub, job.id)
            assert ended.status == "COMPLETED"
    assert len(results) == RACE_JOBS * len(STREAM_OFFSETS_MS)
    wrong = [len(r) for r in results if r != expected]
    assert not wrong, f"{len(wrong)} streams got the wrong bytes (lengths {wrong[:10]})"


def _stop(stub: tools.worker_pb2_grpc.JobServiceStub, job_id: str) -> worker_pb2.StopJobRes | str:
    """StopJob's record, or FAILED_PRECONDITION's message (anything else fails the test)."""
    try:
        return stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
    return str(details)


async def _stop_after(
    arena: Arena, delay_ms: int, outcomes: dict[str, worker_pb2.StopJobRes | str]
) -> None:
    job = await in_thread(
        arena.stub.CreateJob,
        worker_pb2.CreateJobReq(command="/bin/sleep", args=[str(STOP_SLEEP_S)]),
    )
    await trio.sleep(delay_ms / 1000)  # the race's offset, not a synchronisation
    outcomes[job.id] = await in_thread(_stop, arena.stub, job.id)


async def test_stops_racing_natural_exits_agree_with_the_record(arena: Arena) -> None:
    """Rounds of 20 jobs that exit by themselves after 50 ms, each stopped 0..95 ms after
    creation (more rounds until the probe ran a few times). Each StopJob either wins
    (STOPPED record) or is told the job is not running (then the job COMPLETED); GetJob
    agrees with what StopJob said, and no process is left."""
    outcomes: dict[str, worker_pb2.StopJobRes | str] = {}
    rounds = 0
    async with arena.attack(f"{STOP_JOBS} stops racing natural exits, repeated") as loop:
        while rounds == 0 or len(loop.samples) < tools.MIN_PROBES_DURING:
            assert rounds < MAX_ROUNDS, "the probe did not run"
            rounds += 1
            async with trio.open_nursery() as nursery:
                for delay in STOP_DELAYS_MS[:STOP_JOBS]:
                    nursery.start_soon(_stop_after, arena, delay, outcomes)
    assert len(outcomes) == STOP_JOBS * rounds
    kinds = {"stopped": 0, "not running": 0}
    for job_id, outcome in outcomes.items():
        final = await in_thread(tools.wait_job_ended, arena.stub, job_id)
        if isinstance(outcome, str):
            assert outcome == f"job is not running: {job_id} (current status: COMPLETED)"
            assert final.status == "COMPLETED"
            kinds["not running"] += 1
        else:
            assert (outcome.id, outcome.status) == (job_id, "STOPPED")
            assert (final.status, final.endTime, final.exitCode) == (
                "STOPPED",
                outcome.endTime,
                outcome.exitCode,
            )
            kinds["stopped"] += 1
    print(f"stops racing exits: {kinds}")


async def test_concurrent_stops_all_return_the_same_stopped_record(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    """20 StopJob calls at once on a job that ignores SIGTERM (so the stop takes the whole
    --stop-grace of 1 s): all 20 return the same STOPPED record. A StopJob after that gets
    FAILED_PRECONDITION with the spec's message."""
    with open_arena(test_pki, tmp_path, "--stop-grace", str(STOP_GRACE_S)) as arena:
        job = await in_thread(
            arena.stub.CreateJob,
            worker_pb2.CreateJobReq(command=JOB_PYTHON, args=["-c", IGNORE_TERM]),
        )
        await in_thread(_wait_ready, arena.stub, job.id)
        results: list[worker_pb2.StopJobRes | str] = []
        async with arena.attack(f"{CONCURRENT_STOPS} concurrent stops"):
            t0 = time.monotonic()
            futures = [
                arena.stub.StopJob.future(worker_pb2.StopJobReq(id=job.id), timeout=10)
                for _ in range(CONCURRENT_STOPS)
            ]
            for future in futures:
                results.append(await in_thread(future.result))
            took = time.monotonic() - t0
        records = {(r.id, r.status, r.endTime, r.exitCode) for r in results}  # type: ignore[union-attr]
        assert len(records) == 1, records
        (record,) = records
        assert record[0] == job.id
        assert record[1] == "STOPPED"
        assert record[2], "no endTime"
        assert took >= STOP_GRACE_S * 0.9, f"stop returned after {took:.2f} s, before the grace"
        with tools.grpc_stub(arena.address, test_pki) as stub:
            with pytest.raises(grpc.RpcError) as refused:
                stub.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            expected = f"job is not running: {job.id} (current status: STOPPED)"
            assert refused.value.details() == expected
            final = stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=5)
        assert (final.status, final.endTime, final.exitCode) == record[1:]
        print(f"{CONCURRENT_STOPS} concurrent stops: one record {record} after {took:.2f} s")


async def test_late_frames_on_finished_streams_do_not_kill_the_connection(arena: Arena) -> None:
    """A client may send WINDOW_UPDATE or RST_STREAM for a stream the server has already
    finished (RFC 7540 6.9, 5.1): grpcio does, when its reads race the trailers. Here each
    round finishes a GetJob, opens another stream (so the server forgets the first), then
    sends both frames for the finished one. The connection must live on (h2 3.2 alone
    answers GOAWAY STREAM_CLOSED and every call on the connection dies)."""
    async with arena.attack("late frames on finished streams"):
        conn = await tools.RawH2.connect(arena.address, arena.tls())
        try:
            for _ in range(LATE_FRAME_ROUNDS):
                done = await conn.request("GetJob", tools.get_job_request(arena.job_id))
                await conn.until(lambda: conn.finished(done))  # noqa: B023
                assert conn.streams[done].grpc_status == 0
                nxt = await conn.request("GetJob", tools.get_job_request(arena.job_id))
                await conn.until(lambda: conn.finished(nxt))  # noqa: B023
                late = WindowUpdateFrame(done, window_increment=1024).serialize()
                late += RstStreamFrame(done, error_code=8).serialize()  # CANCEL
                await conn.stream.send_all(late)
            last = await conn.request("GetJob", tools.get_job_request(arena.job_id))
            await conn.until(lambda: conn.finished(last))
            assert conn.goaway is None, f"the server ended the connection: {conn.goaway}"
            assert conn.streams[last].grpc_status == 0
        finally:
            await conn.aclose()
