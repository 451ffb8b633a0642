"""The no-cgroup driver: nothing is enforced, a job is its process group.

Used when no cgroup hierarchy is usable (or when resource control is turned
off). The job's main process starts its own session, so its pid is
also its process-group id; killing the job means signalling that group.
Known limit, by construction: a process that leaves the group (``setsid``)
escapes both the kill and the accounting. The real drivers (v1/v2) do not
have this hole.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import trio

from jobworker.cgroups.base import Limits, Usage

__all__ = ["NullCgroup", "NullController", "live_group_members"]

log = logging.getLogger("jobworker.cgroups.null")

# How often kill() looks whether the group is gone: short enough that a stop of a job that
# dies on SIGTERM returns well before the grace period ends, long enough not to spin.
EMPTY_POLL_S = 0.005
# After SIGKILL the kernel tears processes down in milliseconds; past this bound something is
# stuck (uninterruptible sleep) and we log it rather than hang the caller's cleanup.
KILL_WAIT_S = 2.0


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose process group is ``pgid``.

    Zombies count as gone: they are dead, only waiting to be reaped. Reads ``/proc``
    (blocking file work: call it from a thread).
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # no member at all, not even a zombie: skip the /proc scan
    except PermissionError:
        pass  # someone else's group reusing the id; the scan below decides
    members: list[int] = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue  # exited while we looked
            # Fields after "(comm)": state ppid pgrp ...; comm may itself contain ") ".
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) < 3:
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
    return members


class NullCgroup:
    """One job's process group standing in for a cgroup. Nothing is limited or measured."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._pgid: int | None = None

    def procs_files(self) -> list[Path]:
        return []

    def attach(self, pid: int) -> None:
        self._pgid = pid  # the launcher's child starts its own session: pid == pgid

    def oom_kills(self) -> int:
        return 0

    async def wait_oom(self) -> None:
        """Never returns: without a memory cgroup there is no OOM counter to watch."""
        await trio.sleep_forever()

    async def _is_empty(self) -> bool:
        if self._pgid is None:
            return True
        return not await trio.to_thread.run_sync(live_group_members, self._pgid)

    def _signal(self, sig: signal.Signals) -> bool:
        """Signal the whole group; False once it no longer exists."""
        if self._pgid is None:
            return False
        try:
            os.killpg(self._pgid, sig)
        except ProcessLookupError:
            return False
        except OSError as exc:
            log.warning("job %s: cannot signal its process group: %s", self.job_id, exc.strerror)
            return False
        return True

    async def kill(self, grace: float) -> bool:
        """SIGTERM the group, wait until it is gone or ``grace`` passed, then SIGKILL it until
        no live member is left (bounded by KILL_WAIT_S, then logged). True once the group is
        empty. Cancellation stops the waiting; callers run this shielded."""
        if grace > 0 and self._signal(signal.SIGTERM):
            with trio.move_on_after(grace):
                # No event tells when a process group empties: poll, briefly.
                while not await self._is_empty():  # noqa: ASYNC110
                    await trio.sleep(EMPTY_POLL_S)
        deadline = trio.current_time() + KILL_WAIT_S
        while not await self._is_empty():
            if not self._signal(signal.SIGKILL):
                return True  # the group no longer exists
            if trio.current_time() > deadline:
                log.error("job %s: processes survived SIGKILL for %.1f s", self.job_id, KILL_WAIT_S)
                return False
            await trio.sleep(EMPTY_POLL_S)
        return True

    def usage(self) -> Usage:
        return Usage()

    async def remove(self) -> None:
        """Nothing to remove."""


class NullController:
    """The ResourceController for hosts without usable cgroups: limits are recorded, not applied."""

    @property
    def enforced(self) -> bool:
        return False

    @property
    def description(self) -> str:
        return "no cgroups: limits are not enforced; jobs are killed by process group"

    def create(self, job_id: str, limits: Limits) -> NullCgroup:
        return NullCgroup(job_id)

    async def sweep(self) -> list[str]:
        return []

    async def remove_roots(self) -> None:
        return None
