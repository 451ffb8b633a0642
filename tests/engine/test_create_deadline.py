"""A caller whose deadline passes before its job starts gets no job, and uses no id."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.engine import JobManager, JobSpec
from jobworker.engine import manager as manager_module

LOOKUP_S = 2.0  # how long the command lookup seems to take: past the caller's deadline


async def test_a_deadline_that_passes_before_the_start_starts_nothing(
    manager: JobManager,
    data_dir: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before its start, create waits only on the thread that looks the command up, and Trio
    # turns a passed deadline into a cancellation only at a schedule point. A slow lookup
    # (or a busy server) cannot be produced on demand: the real lookup runs, then the clock
    # jumps past the deadline before the thread returns.
    mock_clock.rate = 1.0  # real time otherwise: real processes may run
    lookup = manager_module.resolve_command  # type: ignore[attr-defined]  # the seam patched below

    def slow_lookup(command: str, search_path: str) -> str:
        found = lookup(command, search_path)
        trio.from_thread.run_sync(mock_clock.jump, LOOKUP_S)
        return found

    monkeypatch.setattr(manager_module, "resolve_command", slow_lookup)
    with trio.move_on_after(LOOKUP_S / 2) as scope:
        await manager.create(JobSpec("true"))
    assert scope.cancelled_caught
    assert manager.list() == []
    assert not (data_dir / "jobs" / "1").exists()
    monkeypatch.undo()
    assert (await manager.create(JobSpec("true"))).id == "1"  # no id was used
