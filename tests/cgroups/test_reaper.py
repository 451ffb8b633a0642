"""The orphan reaper: orphans reaped, owned children's statuses never stolen."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator

import pytest
import trio

from jobworker.launch.reaper import Reaper
from tests.support import proc_state

from .helpers import poll_until


@pytest.fixture
async def reaper(nursery: trio.Nursery) -> AsyncIterator[Reaper]:
    r = Reaper()
    r.enable()
    try:
        await nursery.start(r.run)
        yield r
    finally:
        r.disable()


async def run_owned(reaper: Reaper, argv: list[str]) -> tuple[int, bytes]:
    """Spawn as the engine does (spawning() until protected), wait, release."""
    with reaper.spawning():
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        reaper.protect(proc.pid)
    try:
        assert proc.stdout is not None
        out = b""
        while chunk := await proc.stdout.receive_some():
            out += chunk
        return await proc.wait(), out
    finally:
        reaper.release(proc.pid)


async def test_orphans_are_reaped(reaper: Reaper) -> None:
    # The shell leaves two children behind; they reparent to us (subreaper) and exit.
    status, out = await run_owned(
        reaper, ["/bin/sh", "-c", "sleep 0.05 & echo $!; sleep 0.05 & echo $!; exit 3"]
    )
    orphans = [int(x) for x in out.split()]
    assert status == 3
    assert len(orphans) == 2
    await poll_until(lambda: all(proc_state(pid) is None for pid in orphans), 5, "orphans reaped")
    assert reaper.reaped >= 2


async def test_protected_children_keep_their_status_under_load(reaper: Reaper) -> None:
    """Many fast children spawned at once while orphans keep dying: no status is stolen."""
    results: dict[int, int] = {}

    async def one(n: int) -> None:
        # Each child leaves an orphan that dies at once, then exits with its own code.
        status, _ = await run_owned(reaper, ["/bin/sh", "-c", f"true & exit {n}"])
        results[n] = status

    async with trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(one, n)
    assert results == {n: n for n in range(60)}
    await poll_until(lambda: reaper.reap_once() == 0 and reaper.reaped >= 60, 5, "orphans")


async def test_reap_once_holds_off_while_spawning(reaper: Reaper) -> None:
    with reaper.spawning():
        proc = subprocess.Popen(["true"])
        await poll_until(lambda: proc_state(proc.pid) == "Z", 5, "a zombie child")
        reaper.reap_now()
        await trio.testing.wait_all_tasks_blocked()
        assert reaper.reap_once() == 0
        assert proc_state(proc.pid) == "Z"  # still ours to wait for
        reaper.protect(proc.pid)
    assert proc.wait() == 0
    reaper.release(proc.pid)


async def test_orphan_behind_a_protected_zombie_is_reaped(reaper: Reaper) -> None:
    """The first zombie waitid() names is protected and its owner does not reap it yet: the
    orphan behind it is still reaped (by the fallback scan), and the owner keeps its status."""
    # Forked from this (the main) thread, like the orphans that reparent to us: it comes
    # first in the children list waitid() walks (trio's open_process forks in a worker
    # thread, whose children come later).
    with reaper.spawning():
        proc = subprocess.Popen(
            ["/bin/sh", "-c", "sleep 0.05 >/dev/null & echo $!; exit 5"], stdout=subprocess.PIPE
        )
        reaper.protect(proc.pid)
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())  # the shell exits right after this line
        await poll_until(lambda: proc_state(proc.pid) == "Z", 5, "the protected zombie")
        await poll_until(lambda: proc_state(orphan) is None, 5, "the orphan reaped")
        assert proc_state(proc.pid) == "Z"  # not stolen: still ours to wait for
        assert reaper.scans >= 1
        assert proc.wait() == 5
    finally:
        reaper.release(proc.pid)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_no_proc_scan_when_owners_reap_promptly(reaper: Reaper) -> None:
    """A job's exit (its protected main process dying first) costs no /proc scan: the reaper
    waits for the owner's release() instead. Orphans are still all reaped."""
    orphans: list[int] = []
    for _ in range(20):
        # The orphan outlives the shell, so the protected shell is the first zombie.
        status, out = await run_owned(reaper, ["/bin/sh", "-c", "sleep 0.01 & echo $!; exit 0"])
        assert status == 0
        orphans.append(int(out))
    await poll_until(lambda: all(proc_state(pid) is None for pid in orphans), 5, "orphans")
    # The old reaper scanned on each of these exits; a few may still hit the fallback on a
    # loaded machine (an owner slower than PROTECTED_ZOMBIE_WAIT_S), not most.
    assert reaper.scans < 5
