"""Output fan-out: byte-exact for every reader, lagging readers catch up from the file,
the pump never waits for a reader, memory stays flat."""

from __future__ import annotations

import gc
import hashlib
import math
import os
import random
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.engine import JobManager, JobStatus
from jobworker.engine.output import LIVE_WINDOW_CHUNKS, OutputLog, OutputReader

from .helpers import py, read_all, wait_ended, wait_until

# A job writing ``size`` bytes of seeded random data in irregular writes; the test makes
# the same bytes to compare checksums.
WRITER = (
    "import random, sys\n"
    "size, seed = int(sys.argv[1]), int(sys.argv[2])\n"
    "data = random.Random(seed).randbytes(size)\n"
    "sizes = random.Random(seed + 1)\n"
    "out = sys.stdout.buffer\n"
    "pos = 0\n"
    "while pos < size:\n"
    "    step = sizes.randint(1, 200000)\n"
    "    out.write(data[pos:pos + step]); out.flush()\n"
    "    pos += step\n"
)


def expected(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Collector:
    """Reads a job's output from some offset, hashing as it goes (bounded memory)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self.catch_ups = 0

    async def run(
        self,
        manager: JobManager,
        job_id: str,
        *,
        offset: int = 0,
        max_chunk: int = 65536,
        delay: float = 0.0,
        slow_chunks: int | None = None,
    ) -> None:
        """``delay``: sleep that long after each chunk (only the first ``slow_chunks``)."""
        async with manager.follow(job_id, offset, max_chunk) as reader:
            async for chunk in reader:
                assert 1 <= len(chunk) <= max_chunk
                self.hash.update(chunk)
                self.count += len(chunk)
                if delay and (slow_chunks is None or slow_chunks > 0):
                    await trio.sleep(delay)
                    if slow_chunks is not None:
                        slow_chunks -= 1
            self.catch_ups = reader.catch_ups


async def test_readers_joining_at_different_times_get_every_byte(manager: JobManager) -> None:
    size, seed = 24 * 1024 * 1024, 7
    want = expected(size, seed)
    await manager.create(py(WRITER, str(size), str(seed)))
    early, slow, middle, late, offset = (
        Collector(),
        Collector(),
        Collector(),
        Collector(),
        Collector(),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(early.run, manager, "1")
        nursery.start_soon(lambda: slow.run(manager, "1", max_chunk=32768, delay=0.001))
        await wait_until(lambda: manager.output_size("1") >= 2 * 1024 * 1024)
        nursery.start_soon(middle.run, manager, "1")
        nursery.start_soon(lambda: offset.run(manager, "1", offset=12345, max_chunk=1000))
        await wait_until(lambda: manager.output_size("1") >= 12 * 1024 * 1024)
        nursery.start_soon(late.run, manager, "1")
    record = manager.get("1")
    assert record.status is JobStatus.COMPLETED
    assert record.output_bytes == size
    digest = hashlib.sha256(want).hexdigest()
    for collector in (early, slow, middle, late):
        assert collector.count == size
        assert collector.hash.hexdigest() == digest
    assert offset.count == size - 12345
    assert offset.hash.hexdigest() == hashlib.sha256(want[12345:]).hexdigest()
    assert slow.catch_ups >= 1  # the slow reader really went through the file path


async def test_pump_never_waits_for_a_stuck_reader(manager: JobManager) -> None:
    size, seed = 8 * 1024 * 1024, 3
    await manager.create(py(WRITER, str(size), str(seed)))
    async with manager.follow("1") as stuck:
        first = await stuck.__anext__()  # on the live path, then reads nothing more
        record = await wait_ended(manager, "1", timeout=10)
        assert record.status is JobStatus.COMPLETED
        rest = bytearray(first)
        async for chunk in stuck:
            rest += chunk
    assert bytes(rest) == expected(size, seed)


async def test_reader_joining_after_the_end_gets_everything(manager: JobManager) -> None:
    size, seed = 3 * 1024 * 1024 + 17, 11
    await manager.create(py(WRITER, str(size), str(seed)))
    await wait_ended(manager, "1")
    assert await read_all(manager, "1", max_chunk=4096) == expected(size, seed)
    assert await read_all(manager, "1", offset=size - 5) == expected(size, seed)[-5:]
    assert await read_all(manager, "1", offset=size + 100) == b""


async def test_memory_stays_flat_for_large_output(manager: JobManager) -> None:
    size = 200 * 1024 * 1024
    writer = (
        "import os\n"
        "block = bytes(range(256)) * 256\n"
        f"for _ in range({size} // len(block)):\n"
        "    os.write(1, block)\n"
    )
    fast, slow = Collector(), Collector()
    gc.collect()
    tracemalloc.start()
    try:
        await manager.create(py(writer))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast.run, manager, "1")
            nursery.start_soon(lambda: slow.run(manager, "1", delay=0.001, slow_chunks=300))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"200 MB through 2 readers: tracemalloc peak {peak / 1e6:.1f} MB")
    assert fast.count == slow.count == size
    assert slow.catch_ups >= 1
    assert peak < 12 * 1024 * 1024


# --- OutputLog on its own (no process): the live/file boundary, deterministically ---


async def test_lagging_reader_is_dropped_then_rejoins_without_gap(tmp_path: Path) -> None:
    output = OutputLog(tmp_path / "out.log")
    await trio.to_thread.run_sync(output.open_append)
    chunks = [bytes([n % 251]) * (1000 + n) for n in range(3 * LIVE_WINDOW_CHUNKS)]
    async with output.follow(0, max_chunk=700) as reader:
        first: list[bytes] = []

        async def read_first() -> None:
            first.append(await reader.__anext__())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_first)
            await wait_until(lambda: output.live_readers == 1)  # caught up: on the live path
            await output.append(chunks[0])
        got = bytearray(first[0])
        assert got == chunks[0][:700]
        assert output.live_readers == 1
        for chunk in chunks[1:]:
            await output.append(chunk)  # never blocks, however far behind the reader is
        assert output.live_readers == 0  # dropped when its window filled
        # Drain what it has, catch up from the file, rejoin the live path.
        while len(got) < output.length:
            got += await reader.__anext__()
        assert output.live_readers == 0
        await output.append(b"tail")
        got += await reader.__anext__()  # from the file, then subscribe again
        assert bytes(got) == b"".join(chunks) + b"tail"
        assert reader.catch_ups == 1
        output.finish()
        async for _ in reader:
            raise AssertionError("nothing left to read")
    assert output.live_readers == 0


async def test_leaving_a_reader_releases_it(tmp_path: Path) -> None:
    output = OutputLog(tmp_path / "out.log")
    await trio.to_thread.run_sync(output.open_append)
    await output.append(b"hello")
    with trio.move_on_after(0.05):
        async with output.follow() as reader:
            assert await reader.__anext__() == b"hello"
            await reader.__anext__()  # waits live, then is cancelled
    assert output.live_readers == 0
    assert reader._fd is None
    await output.append(b"more")  # no subscriber left to feed
    output.finish()


async def test_split_chunks_respect_max_chunk(tmp_path: Path) -> None:
    output = OutputLog(tmp_path / "out.log")
    await trio.to_thread.run_sync(output.open_append)
    data = bytes(range(256)) * 10
    async with output.follow(0, max_chunk=100) as reader, trio.open_nursery() as nursery:
        got = bytearray()

        async def consume(reader: OutputReader) -> None:
            async for chunk in reader:
                assert 1 <= len(chunk) <= 100
                got.extend(chunk)

        nursery.start_soon(consume, reader)
        await wait_until(lambda: output.live_readers == 1)
        await output.append(data)
        await output.append(data)
        output.finish()
    assert bytes(got) == data * 2


# --- Any interleaving of appends, joins, reads and leaves: every reader gets exactly its bytes ---

Op = tuple[str, int, int]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(min_value=1, max_value=3),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["append", "join", "read", "leave"]),
            st.integers(min_value=0, max_value=50),
            st.integers(min_value=1, max_value=40),
        ),
        max_size=60,
    ),
)
def test_any_interleaving_is_exact(window: int, ops: list[Op]) -> None:
    trio.run(check_interleaving, window, ops)


class ModelReader:
    """A reader task that reads only as many chunks as the test grants it."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.got = bytearray()
        self.scope = trio.CancelScope()
        self.permits, self._grants = trio.open_memory_channel[int](math.inf)
        self.wanted = 0  # chunks granted, not yet read

    def grant(self, count: int) -> None:
        self.wanted += count
        self.permits.send_nowait(count)

    def starved(self, length: int) -> bool:
        """Granted reads, and data it has not delivered: it must be making progress."""
        return self.wanted > 0 and self.start + len(self.got) < length

    async def run(self, output: OutputLog, max_chunk: int) -> None:
        with self.scope:
            async with output.follow(self.start, max_chunk) as reader:
                async for count in self._grants:
                    for _ in range(count):
                        try:
                            chunk = await reader.__anext__()
                        except StopAsyncIteration:
                            return
                        assert 1 <= len(chunk) <= max_chunk
                        self.got += chunk
                        self.wanted -= 1


async def check_interleaving(window: int, ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as directory, trio.fail_after(5):  # a stall is a bug
        output = OutputLog(Path(directory) / "out.log", live_window=window)
        await trio.to_thread.run_sync(output.open_append)
        written = bytearray()
        readers: list[ModelReader] = []
        left: list[ModelReader] = []
        async with trio.open_nursery() as nursery:
            for kind, a, b in ops:
                if kind == "append":
                    data = bytes((len(written) + i) % 251 for i in range(a + 1))
                    written += data
                    await output.append(data)
                elif kind == "join":
                    reader = ModelReader(min(a, len(written) + 5))  # sometimes past the end
                    readers.append(reader)
                    nursery.start_soon(reader.run, output, b)
                elif kind == "read" and readers:
                    readers[a % len(readers)].grant(b)
                elif kind == "leave" and readers:
                    reader = readers.pop(a % len(readers))
                    reader.scope.cancel()
                    left.append(reader)
                # Liveness: every reader with grants gets the data that exists, now (file
                # reads run in threads, so poll; the deadline above turns a stall into a failure).
                await trio.testing.wait_all_tasks_blocked()
                while any(reader.starved(output.length) for reader in readers):
                    await trio.sleep(0.0005)
            output.finish()
            for reader in readers:
                reader.grant(1 << 30)
                reader.permits.close()
        for reader in readers:
            assert bytes(reader.got) == bytes(written[reader.start :])
        for reader in left:
            assert bytes(reader.got) == bytes(
                written[reader.start : reader.start + len(reader.got)]
            )
        assert output.live_readers == 0


async def test_a_disk_that_refuses_every_write_loses_output_counted_never_raising() -> None:
    # /dev/full: every write fails with ENOSPC, as on a full disk.
    output = OutputLog(Path("/dev/full"), job_id="9")
    output.open_append()
    for _ in range(3):
        await output.append(b"x" * 1000)
    await output.write_owed_marker()  # no room and no reserve: the loss stays in the reason
    output.finish()
    assert output.length == 0  # nothing reached the file, nothing is announced
    assert output.lost_bytes == 3000
    assert output.loss_summary == "3000 bytes of output lost: data disk full"


async def test_a_catch_up_read_of_pages_not_in_memory_goes_through_a_thread(
    tmp_path: Path,
) -> None:
    """A reader catching up reads the page cache on the event loop (RWF_NOWAIT) and falls
    back to a thread for what is only on disk: the bytes are the same either way."""
    output = OutputLog(tmp_path / "out.log")
    await trio.to_thread.run_sync(output.open_append)
    data = bytes(range(256)) * 4096  # 1 MiB
    await output.append(data)
    output.finish()
    fd = os.open(output.path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            pass  # as intended: the first read must wait for the disk
        else:
            pytest.skip("this file system kept the pages in memory (tmpfs?)")
    finally:
        os.close(fd)
    for _ in range(2):  # first from the disk (a thread), then from the page cache
        async with output.follow(0, max_chunk=65536) as reader:
            assert b"".join([chunk async for chunk in reader]) == data
