"""Giving memory back after a burst: a garbage collection and ``malloc_trim`` once connections
have come and gone.

Why: a burst of clients (hundreds of streams killed mid-output, never-reading readers) leaves
reference cycles behind (exceptions, their tracebacks and frames hold the buffers of the
cancelled handlers). Python only collects them when enough new objects are allocated, which
an idle server never does; and glibc keeps freed heap memory unless told to trim it. Measured
here after 200 streams killed mid-output: RSS 92 MiB, 66 MiB after ``gc.collect()``, 41 MiB
after ``malloc_trim(0)`` (35 MiB before the burst).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# How often, at most, the janitor runs, and only after a connection ended since the last run:
# a collection over this heap takes a few ms, so at most once per period is negligible.
JANITOR_PERIOD_S = 2.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS): then only the collection runs."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryJanitor:
    """Collects garbage and trims the heap after connections ended (``note_churn()``).

    ``run`` loops until cancelled; it owns nothing, so cancellation just stops it.
    """

    def __init__(self, period: float = JANITOR_PERIOD_S) -> None:
        self._period = period
        self._dirty = False
        self._trim = _load_malloc_trim()
        self.runs = 0

    def note_churn(self) -> None:
        """A connection ended: memory may be waiting to be given back."""
        self._dirty = True

    def collect(self) -> None:
        """One collection and trim, now, on the calling thread."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self.runs += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._period)
            if self._dirty:
                self._dirty = False
                gc.collect()
                self.runs += 1
                if self._trim is not None:
                    # Walking a large heap takes tens of ms: off the event loop (ctypes lets
                    # go of the GIL for the call).
                    await trio.to_thread.run_sync(self._trim, 0)
