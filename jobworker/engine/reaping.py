"""What the engine needs from the orphan reaper (``jobworker.cgroups.reaper.Reaper``).

With PR_SET_CHILD_SUBREAPER set, processes a job leaves behind reparent to
the server and must be reaped by it; the reaper does that, except for the
pids the engine still owns (each job's main process, waited for by trio).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

__all__ = ["Reaper"]


class Reaper(Protocol):
    def spawning(self) -> AbstractContextManager[object]:
        """Held around a spawn until its pid is protected: no reaping scan runs meanwhile,
        so a child that exits before trio opens its pidfd keeps its exit status."""
        ...

    def protect(self, pid: int) -> None:
        """Never reap ``pid``: its owner waits for it."""
        ...

    def release(self, pid: int) -> None:
        """``pid`` was reaped by its owner; stop protecting it."""
        ...

    def reap_now(self) -> None:
        """Wake the reaper to collect orphans now (after a job was killed)."""
        ...
