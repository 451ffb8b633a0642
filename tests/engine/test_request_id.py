"""Idempotent creates: a request id used again by its owner returns the job it started
(also while that create is still starting, and after a restart), until its window has passed
or the job is deleted; a refused create does not use its key up; bad ids are refused."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager, utc_now
from jobworker.engine.idempotency import MAX_REQUEST_ID_CHARS, check_request_id
from jobworker.engine.store import record_from_json, record_to_json
from jobworker.errors import InvalidJobSpec

from .helpers import wait_ended

HOUR_S = 3600


def keyed(request_id: str, owner: str = "alice", command: str = "true") -> JobSpec:
    return JobSpec(command, owner=owner, request_id=request_id)


def job_dirs(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "jobs").iterdir())


def stored(data_dir: Path, job_id: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((data_dir / "jobs" / job_id / "job.json").read_text())
    return loaded


async def ended(manager: JobManager, job_id: str) -> None:
    await wait_ended(manager, job_id)
    await manager._jobs[job_id].ended.wait()  # its final record is written


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        ("x" * (MAX_REQUEST_ID_CHARS + 1), "requestId must be at most 128 characters, got 129"),
        ("tab\there", "requestId must be printable ASCII: character 4 is U+0009"),
        ("caf\u00e9", "requestId must be printable ASCII: character 4 is U+00E9"),
        ("del\x7f", "requestId must be printable ASCII: character 4 is U+007F"),
        ("\n", "requestId must be printable ASCII: character 1 is U+000A"),
    ],
)
def test_bad_request_ids_are_refused_saying_why(request_id: str, message: str) -> None:
    with pytest.raises(InvalidJobSpec, match=f"^{re.escape(message)}$"):
        check_request_id(request_id)


def test_the_longest_printable_ids_and_the_empty_one_pass() -> None:
    check_request_id("")
    check_request_id("~" * MAX_REQUEST_ID_CHARS)
    check_request_id("".join(map(chr, range(0x20, 0x7F))))  # space to tilde


async def test_a_bad_request_id_starts_nothing(manager: JobManager, data_dir: Path) -> None:
    with pytest.raises(
        InvalidJobSpec, match=r"^requestId must be at most 128 characters, got 200$"
    ):
        await manager.create(keyed("k" * 200))
    assert manager.list() == []
    assert job_dirs(data_dir) == []
    assert (await manager.create(keyed("k"))).id == "1"  # no id was used


# -- one key, one job ------------------------------------------------------------------------


async def test_the_same_key_twice_returns_the_same_job_as_it_is_now(
    manager: JobManager, data_dir: Path
) -> None:
    first = await manager.create(keyed("abc", command="true"))
    await ended(manager, first.id)
    again = await manager.create(keyed("abc", command="false"))  # the key alone decides
    assert again.id == first.id == "1"
    assert again.status is JobStatus.COMPLETED  # its current state, not the first answer's
    assert again.command == "true"
    assert [r.id for r in manager.list()] == ["1"]
    assert job_dirs(data_dir) == ["1"]
    on_disk = stored(data_dir, "1")
    assert on_disk["request_id"] == "abc"
    assert isinstance(on_disk["request_time"], str)
    assert dt.datetime.fromisoformat(on_disk["request_time"]) == first.start_time


async def test_keys_are_per_owner_and_no_key_means_no_idempotency(
    manager: JobManager, data_dir: Path
) -> None:
    alice = await manager.create(keyed("shared", owner="alice"))
    bob = await manager.create(keyed("shared", owner="bob"))
    assert alice.id != bob.id
    assert (await manager.create(keyed("shared", owner="bob"))).id == bob.id
    plain = [await manager.create(JobSpec("true", owner="alice")) for _ in range(2)]
    assert len({record.id for record in plain}) == 2
    assert job_dirs(data_dir) == ["1", "2", "3", "4"]
    assert stored(data_dir, plain[0].id)["request_id"] == ""
    assert stored(data_dir, plain[0].id)["request_time"] is None


async def test_concurrent_creates_with_one_key_make_one_job(
    manager: JobManager, data_dir: Path
) -> None:
    answers: list[str] = []
    spec = replace(keyed("once"), command="sleep", args=("30",))

    async def create() -> None:
        answers.append((await manager.create(spec)).id)

    async with trio.open_nursery() as nursery:
        for _ in range(10):  # all start before the first one's spawn is over
            nursery.start_soon(create)
    assert answers == ["1"] * 10
    assert job_dirs(data_dir) == ["1"]
    assert manager.get("1").status is JobStatus.RUNNING  # every answer waited for the spawn
    await manager.stop("1")


async def test_a_retry_while_the_first_create_starts_waits_and_gets_its_job(
    manager: JobManager,
) -> None:
    spec = replace(keyed("slow"), command="sleep", args=("30",))
    async with trio.open_nursery() as nursery:
        first: list[str] = []

        async def create_first() -> None:
            first.append((await manager.create(spec)).id)

        nursery.start_soon(create_first)
        # Once the first create has its id its spawn is under way: the retry comes now
        # (looked for at every schedule point, which a poll on a timer would miss).
        with trio.fail_after(10):
            while not manager._jobs:
                await trio.sleep(0)
        assert manager.get("1").status is JobStatus.INITIALIZING
        retry = await manager.create(spec)
    assert retry.status is JobStatus.RUNNING
    assert first == [retry.id] == ["1"]
    assert [r.id for r in manager.list()] == ["1"]
    await manager.stop("1")


async def test_a_refused_create_does_not_use_its_key_up(
    manager: JobManager, data_dir: Path
) -> None:
    with pytest.raises(InvalidJobSpec, match="command not found"):
        await manager.create(keyed("k", command="no-such-command-here"))
    created = await manager.create(keyed("k"))
    assert created.id == "1"
    assert job_dirs(data_dir) == ["1"]


async def test_a_create_cancelled_before_or_after_its_start_leaves_one_job_per_key(
    manager: JobManager,
) -> None:
    # A caller's deadline lands before the job has an id (no job, the key unused) or after
    # (the job runs on, bound to the key): either way the retry leaves exactly one job.
    keys = [f"key-{n}" for n in range(20)]
    cancelled = 0
    for n, key in enumerate(keys):
        with trio.move_on_after(0.0005 * (n % 5)) as scope:
            await manager.create(keyed(key))
        cancelled += scope.cancelled_caught
        await manager.create(keyed(key))
    assert cancelled  # a deadline of 0 always lands
    records = manager.list()
    assert sorted(r.request_id for r in records) == sorted(keys)


async def test_concurrent_waiters_of_a_refused_create_make_one_job(manager: JobManager) -> None:
    # The first holder is refused; one of those waiting makes the job, the others get it.
    outcomes: list[str] = []

    async def create(command: str) -> None:
        try:
            outcomes.append((await manager.create(keyed("k", command=command))).id)
        except InvalidJobSpec:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create, "no-such-command-here")
        await trio.testing.wait_all_tasks_blocked()  # it holds the key, in its command lookup
        for _ in range(5):
            nursery.start_soon(create, "true")
    assert sorted(outcomes) == ["1"] * 5 + ["refused"]
    assert [r.id for r in manager.list()] == ["1"]


async def test_a_deleted_job_drops_its_key(manager: JobManager, data_dir: Path) -> None:
    first = await manager.create(keyed("k"))
    await ended(manager, first.id)
    await manager.delete(first.id)
    second = await manager.create(keyed("k"))
    assert second.id == "2"
    assert job_dirs(data_dir) == ["2"]
    assert (await manager.create(keyed("k"))).id == "2"


# -- across a restart, and the window --------------------------------------------------------


async def test_a_key_survives_a_restart(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        first = await manager.create(keyed("durable"))
        await ended(manager, first.id)
    async with open_job_manager(data_dir) as manager:
        again = await manager.create(keyed("durable"))
        assert again == manager.get(first.id)
        assert again.request_id == "durable"
        assert [r.id for r in manager.list()] == [first.id]
        assert (await manager.create(keyed("durable", owner="bob"))).id == "2"


async def test_a_job_running_at_a_crash_keeps_its_key_as_lost(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        record = await manager.create(keyed("crash"))
        await ended(manager, record.id)
    # As if the worker died while it ran: its last record still says RUNNING.
    path = data_dir / "jobs" / "1" / "job.json"
    running = replace(record_from_json(json.loads(path.read_text())), status=JobStatus.RUNNING)
    path.write_text(json.dumps(record_to_json(running)))
    async with open_job_manager(data_dir) as manager:
        again = await manager.create(keyed("crash"))
        assert (again.id, again.status) == ("1", JobStatus.LOST)


def age_key(data_dir: Path, job_id: str, hours: float) -> None:
    """Rewrite the job's record as if its key had been used ``hours`` ago."""
    path = data_dir / "jobs" / job_id / "job.json"
    data = json.loads(path.read_text())
    data["request_time"] = (utc_now() - dt.timedelta(hours=hours)).isoformat()
    path.write_text(json.dumps(data))


async def test_keys_past_the_window_are_forgotten_at_load(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        for key in ("old", "recent"):
            await ended(manager, (await manager.create(keyed(key))).id)
    age_key(data_dir, "1", hours=2)
    age_key(data_dir, "2", hours=0.5)
    async with open_job_manager(data_dir, request_id_ttl=HOUR_S) as manager:
        assert (await manager.create(keyed("recent"))).id == "2"
        assert (await manager.create(keyed("old"))).id == "3"  # expired: a new job
        assert (await manager.create(keyed("old"))).id == "3"  # bound to the new one now
    age_key(data_dir, "2", hours=25)
    async with open_job_manager(data_dir) as manager:  # the default window: 24 h
        assert (await manager.create(keyed("recent"))).id == "4"


async def test_an_expired_key_starts_a_new_job(data_dir: Path) -> None:
    async with open_job_manager(data_dir, request_id_ttl=0) as manager:
        first = await manager.create(keyed("k"))
        second = await manager.create(keyed("k"))
        assert first.id != second.id
        assert job_dirs(data_dir) == ["1", "2"]


def test_records_from_before_request_ids_load_without_a_key() -> None:
    record = record_from_json(
        {
            "format": 1,
            "id": "3",
            "command": "true",
            "args": [],
            "limits": {"cpu_percent": 100, "memory_mb": 512, "io_bps": 0, "pids_max": 4096},
            "status": "COMPLETED",
            "start_time": "2026-01-01T00:00:00+00:00",
        }
    )
    assert (record.request_id, record.request_time) == ("", None)
    moment = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    keyed_record = replace(record, request_id="k", request_time=moment)
    assert record_from_json(record_to_json(keyed_record)) == keyed_record
