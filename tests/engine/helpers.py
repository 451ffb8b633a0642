"""Helpers for the engine tests: real processes, polled with deadlines (never slept on)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import trio

from jobworker.engine import JobManager, JobRecord, JobSpec

PY = sys.executable  # an absolute path: used as given, not looked up in the job's PATH
POLL_S = 0.005


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(POLL_S)


async def wait_ended(manager: JobManager, job_id: str, timeout: float = 10.0) -> JobRecord:
    await wait_until(lambda: manager.get(job_id).status.is_terminal, timeout)
    return manager.get(job_id)


async def read_all(
    manager: JobManager, job_id: str, offset: int = 0, max_chunk: int = 65536
) -> bytes:
    out = bytearray()
    async with manager.follow(job_id, offset, max_chunk) as reader:
        async for chunk in reader:
            assert 1 <= len(chunk) <= max_chunk
            out += chunk
    return bytes(out)


async def wait_output(
    manager: JobManager, job_id: str, needle: bytes, timeout: float = 10.0
) -> bytes:
    """Wait until the job's output (so far) contains ``needle``; return that output."""
    path: Path = manager._jobs[job_id].output.path

    def seen() -> bool:
        return needle in path.read_bytes()

    await wait_until(seen, timeout)
    return path.read_bytes()


def py(code: str, *args: str) -> JobSpec:
    """A job running ``code`` with the test's Python interpreter."""
    return JobSpec(PY, ("-c", code, *args))


def sh(script: str) -> JobSpec:
    return JobSpec("sh", ("-c", script))
