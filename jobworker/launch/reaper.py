"""Reap orphans in the server: it is a child subreaper, so the processes of a launcher that
died (the jobs' inits and main processes) reparent to it and their zombies must be reaped
here (they keep counting in pids.current, and PID 1 on our machines reaps lazily, ~1.25 s).
The launcher itself reaps everything a job leaves while it lives.

The server's own child, the launcher, is reaped by trio (``Process.wait()``): the reaper
must never steal its status. So ``with reaper.spawning():`` is held around its spawn until
``protect(pid)``: trio runs Popen in a thread, and a child may already be a zombie before
trio has opened its pidfd.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PROC = Path("/proc")
MAX_REAP_ROUNDS = 10_000  # bounds one reap_once(); the next SIGCHLD continues
# waitid() names only the first zombie child. When that one is protected (a job's main
# process: every job's exit), finding the others takes a scan of every /proc/*/stat, ~25 %
# of the server's CPU in a CreateJob loop. Its owner reaps it within milliseconds and then
# calls release() + reap_now(), which unblocks waitid: so run() waits for that, and scans
# only if the protected zombie still blocks the way this long (orphans behind it are then
# reaped at most this late; PID 1 would take ~1.25 s).
PROTECTED_ZOMBIE_WAIT_S = 0.1


def set_child_subreaper(enable: bool = True) -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of our descendants reparent to this process."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def zombie_children(parent: int) -> list[int]:
    """Pids of ``parent``'s children in state Z, from /proc/*/stat (no CONFIG_PROC_CHILDREN)."""
    found: list[int] = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # "pid (comm) S ppid ...": comm may hold spaces and parens; split after the last ')'.
        fields = data[data.rfind(b")") + 2 :].split(None, 2)
        if len(fields) >= 2 and fields[0] == b"Z" and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


class Reaper:
    """Reaps zombie children that nobody else waits for.

    ``run()`` is a long-lived task: it wakes on SIGCHLD and on ``reap_now()``. Cancellation
    just ends it (zombies left then are reaped by whoever inherits them).
    """

    def __init__(self) -> None:
        self._protected: set[int] = set()
        self._spawning = 0
        self._wake = trio.Event()
        self.reaped = 0  # orphans reaped so far (for logs and tests)
        self.scans = 0  # full /proc scans so far (for tests: the costly path)

    def enable(self) -> None:
        """Become a child subreaper (needs nothing special; fails only on non-Linux)."""
        set_child_subreaper(True)

    def disable(self) -> None:
        set_child_subreaper(False)

    def protect(self, pid: int) -> None:
        """Never reap ``pid``: its owner waits for it (trio's Process.wait)."""
        self._protected.add(pid)

    def release(self, pid: int) -> None:
        self._protected.discard(pid)

    @contextmanager
    def spawning(self) -> Iterator[None]:
        """Hold off reaping while a child is being spawned and not yet protected."""
        self._spawning += 1
        try:
            yield
        finally:
            self._spawning -= 1
            if self._spawning == 0:
                self.reap_now()  # a SIGCHLD may have been skipped meanwhile

    def reap_now(self) -> None:
        """Ask the run() task to look for zombies now (safe from any Trio task)."""
        self._wake.set()

    def reap_once(self) -> int:
        """Reap every unprotected zombie child; return how many. A no-op while spawning."""
        return self._reap(scan=True)[0]

    def _reap(self, *, scan: bool) -> tuple[int, bool]:
        """Reap unprotected zombie children; return (how many, blocked). ``blocked``: a
        protected zombie came first and ``scan`` was False, so zombies behind it may remain."""
        if self._spawning:
            return 0, False
        me = os.getpid()
        count = 0
        blocked = scanned = False
        # Fast path: waitid(WNOWAIT) names a zombie child without reaping it; none -> done.
        try:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return 0, False
        for _ in range(MAX_REAP_ROUNDS):
            if peek is None:
                break
            if peek.si_pid not in self._protected:
                candidates = [peek.si_pid]
            elif scanned:
                break  # the scan saw every zombie then; later deaths send their own SIGCHLD
            elif scan:
                scanned = True
                self.scans += 1
                candidates = [p for p in zombie_children(me) if p not in self._protected]
            else:
                blocked = True
                break
            if not candidates:
                break
            for pid in candidates:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        count += 1
                except ChildProcessError:
                    continue
            try:
                peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
        self.reaped += count
        return count, blocked

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD / reap_now() until cancelled. Must run in the main thread
        (signal handling). started() fires once SIGCHLD is being received."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            async with trio.open_nursery() as nursery:

                async def forward_signals() -> None:
                    async for _ in signals:
                        self.reap_now()

                nursery.start_soon(forward_signals)
                task_status.started()
                self.reap_now()  # anything that died before we listened
                blocked_since: float | None = None
                while True:
                    if blocked_since is None:
                        await self._wake.wait()
                    else:
                        # Deadline from the first blocked round: wake-ups (other jobs'
                        # SIGCHLDs) must not postpone the scan forever.
                        with trio.move_on_at(blocked_since + PROTECTED_ZOMBIE_WAIT_S):
                            await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
                    overdue = (
                        blocked_since is not None
                        and trio.current_time() >= blocked_since + PROTECTED_ZOMBIE_WAIT_S
                    )
                    _, blocked = self._reap(scan=overdue)
                    if not blocked:
                        blocked_since = None  # done, or scanned: wait for the next wake-up
                    elif blocked_since is None:
                        blocked_since = trio.current_time()
