"""Helpers for the cgroup driver tests: spawning, polling with a deadline, /proc inspection."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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
