"""Small, synchronous helpers over cgroupfs files.

cgroupfs reads and writes are in-memory kernel operations (microseconds), so the drivers
call these directly from async code instead of going through a thread.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import trio

from jobworker.errors import LimitRefused

log = logging.getLogger(__name__)

RMDIR_RETRY_S = 0.005  # the kernel drops exiting tasks from a cgroup within milliseconds
RMDIR_TIMEOUT_S = 2.0  # then give up and log: a stuck cgroup must not hang cleanup


def write_file(path: Path, value: str) -> None:
    """One write(2) of ``value`` (cgroupfs takes one value per write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def write_limit(path: Path, value: str, limit_name: str) -> None:
    """Write a limit; a refusal becomes LimitRefused naming the limit and only the file name."""
    try:
        write_file(path, value)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else "error"
        raise LimitRefused(
            f"{limit_name}: the kernel refused {path.name}={value.strip()} ({why})"
        ) from None


def read_text(path: Path) -> str | None:
    """The file's text, or None if it (or its cgroup) is gone."""
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def parse_keyed(text: str) -> dict[str, int]:
    """Parse a flat keyed file (``key value`` per line: memory.events, cgroup.events,
    cpu.stat, memory.oom_control); lines that are not ``key integer`` are skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def parse_io_v1(text: str) -> tuple[int, int] | None:
    """Bytes read and written, over every device, from v1's
    ``blkio.throttle.io_service_bytes`` (``MAJ:MIN Read N`` lines); None if it has none."""
    totals = {"Read": 0, "Write": 0}
    seen = False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in totals and parts[2].isdigit():
            totals[parts[1]] += int(parts[2])
            seen = True
    return (totals["Read"], totals["Write"]) if seen else None


def parse_io_v2(text: str) -> tuple[int, int] | None:
    """Bytes read and written, over every device, from v2's ``io.stat`` (``MAJ:MIN
    rbytes=N wbytes=N ...`` lines); None if the file has no line."""
    totals = {"rbytes": 0, "wbytes": 0}
    seen = False
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key in totals and value.isdigit():
                totals[key] += int(value)
                seen = True
    return (totals["rbytes"], totals["wbytes"]) if seen else None


def read_keyed(path: Path) -> dict[str, int]:
    """parse_keyed() of the file; {} if it is gone."""
    return parse_keyed(read_text(path) or "")


def cgroup_tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, deepest first (the order rmdir needs)."""
    found: list[Path] = []
    try:
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            found.append(Path(dirpath))
    except OSError:
        pass
    if not found and top.is_dir():
        found.append(top)
    return found


def pids_in(tops: Iterable[Path]) -> set[int]:
    """Every pid listed in cgroup.procs of the given cgroups and their descendants."""
    pids: set[int] = set()
    for top in tops:
        for directory in cgroup_tree(top):
            for line in (read_text(directory / "cgroup.procs") or "").split():
                if line.isdigit():
                    pids.add(int(line))
    return pids


def signal_pids(pids: Iterable[int], signum: int) -> None:
    """Send ``signum`` to each pid; pids already gone are ignored."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("no permission to signal pid %d", pid)


async def remove_dirs(tops: Iterable[Path]) -> list[Path]:
    """rmdir each cgroup tree, retrying on EBUSY for up to RMDIR_TIMEOUT_S.

    Returns the directories that are still there (already logged). Cancellation: the caller
    runs this under a shield; the retry loop is bounded.
    """
    pending = [d for top in tops for d in cgroup_tree(top)]
    deadline = trio.current_time() + RMDIR_TIMEOUT_S
    while pending:
        left: list[Path] = []
        for directory in pending:
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)
                    continue
                left.append(directory)
        pending = left
        if not pending:
            break
        if trio.current_time() >= deadline:
            log.error("cgroups still busy after %.1f s: %s", RMDIR_TIMEOUT_S, pending)
            break
        await trio.sleep(RMDIR_RETRY_S)
    return pending
