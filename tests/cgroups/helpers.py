"""Helpers for the cgroup driver tests: spawning, polling with a deadline, /proc inspection."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

# Every test controller lives under this root name: never a real server's cgroups.
TEST_ROOT = f"jobworker-test-{os.getpid()}"


async def spawn(argv: Sequence[str], **kwargs: Any) -> trio.Process:
    """Start a process (in its own session, as the engine does)."""
    return await trio.lowlevel.open_process(list(argv), start_new_session=True, **kwargs)


async def poll_until(predicate: Callable[[], object], within: float, what: str) -> None:
    """Poll ``predicate()`` every 5 ms until true; fail the test after ``within`` seconds."""
    with trio.move_on_after(within):
        while not predicate():
            await trio.sleep(0.005)
        return
    pytest.fail(f"timed out after {within} s waiting for {what}")


def proc_state(pid: int) -> str | None:
    """Process state letter from /proc/<pid>/stat, None if the pid is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def alive(pid: int) -> bool:
    """True when the process exists and is not a zombie (zombies are dead, awaiting reaping)."""
    return proc_state(pid) not in (None, "Z", "X")


def descendants(root: int) -> set[int]:
    """Live descendants of ``root`` by walking /proc ppid links."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                data = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = int(data[data.rfind(b")") + 2 :].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found
