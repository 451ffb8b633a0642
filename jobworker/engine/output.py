"""One job's output: an append-only log file, its length, and lossless fan-out to readers.

Every byte the job writes has an offset. The pump appends a chunk to the file
(``os.write`` on an ``O_APPEND`` fd: no userspace buffer), *then* raises the
length and offers ``(start_offset, chunk)`` to each live reader with
``send_nowait``. A reader whose bounded channel is full is dropped from the
live set on the spot; it keeps what it had buffered, then reads the file from
its own offset, and subscribes again once it has caught up with the length.
Because a reader subscribes only when its offset equals the length (checked
and done without a checkpoint in between), every live chunk it receives
starts at or before its offset: overlap is discarded, a gap cannot occur.

Memory per reader is bounded by LIVE_WINDOW_BYTES of queued pump chunks (or a
single larger chunk) plus the one chunk or file read (FILE_READ_BYTES) it is
delivering, whatever the size of the output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

__all__ = ["LIVE_WINDOW_CHUNKS", "OutputLog", "OutputReader"]

log = logging.getLogger("jobworker.engine")

# Chunks a live reader may have queued before it is dropped to the file path: 16 x 64 KiB
# = 1 MiB per reader at most, enough to absorb scheduling jitter of a healthy reader.
LIVE_WINDOW_CHUNKS = 16
# The same window in bytes: pump chunks range from a byte to a full pipe (1 MiB, see
# engine.job), so the chunk count alone does not bound memory. One chunk is always accepted
# into an empty queue.
LIVE_WINDOW_BYTES = 1024 * 1024
# Catch-up reads from the file: one thread round trip per 256 KiB instead of one per 64 KiB
# chunk (a thread hop costs about as much CPU as sending a chunk); delivered in max_chunk
# slices. 100 readers catching up at once hold 25 MiB.
FILE_READ_BYTES = 256 * 1024
FILE_READ_THREADS = 2  # per output log (see OutputLog.read_limiter)

Chunk = tuple[int, bytes]  # (offset of its first byte, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class OutputLog:
    """The output file of one job, its current length, and the readers following it live.

    Created open for appending for a live job (``open_append``), or already ended for a
    job loaded from disk. ``finish()`` marks the final length: readers end once they have
    delivered it.
    """

    def __init__(
        self,
        path: Path,
        *,
        length: int = 0,
        ended: bool = False,
        live_window: int = LIVE_WINDOW_CHUNKS,
    ) -> None:
        self.path = path
        self._live_window = live_window
        self.length = length
        self.ended = ended
        self._fd: int | None = None
        self._write_failed = False
        self._live: dict[OutputReader, trio.MemorySendChannel[Chunk]] = {}
        # Catch-up reads of this log in flight at once: 100 readers catching up together
        # would otherwise take 40 threads (trio's default limit), each with its buffer and
        # its own malloc arena: 110-140 MB of server RSS with 100 readers (bench fan-out).
        self.read_limiter = trio.CapacityLimiter(FILE_READ_THREADS)

    def open_append(self) -> None:
        """Create the file and open it for appending (blocking: call from a thread)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)

    async def append(self, data: bytes) -> None:
        """Write ``data`` at the end of the file, then publish it. Never waits for a reader.

        The write runs in a thread and is not abandoned on cancellation, so the length
        always matches what the file holds.
        """
        if self._fd is None or self._write_failed:
            return
        try:
            await trio.to_thread.run_sync(_write_all, self._fd, data)
        except OSError:
            # The job must not block on its pipe because our disk is full: keep draining,
            # stop recording, say so once.
            self._write_failed = True
            log.exception("cannot write the output log %s; output discarded", self.path)
            return
        start = self.length
        self.length += len(data)
        for reader, send in list(self._live.items()):
            if reader.queued_bytes and reader.queued_bytes + len(data) > LIVE_WINDOW_BYTES:
                send.close()  # too slow for the live path (see WouldBlock below)
                del self._live[reader]
                reader.catch_ups += 1
                continue
            try:
                send.send_nowait((start, data))
                reader.queued_bytes += len(data)
            except trio.WouldBlock:
                # Too slow for the live path: it finishes its queue, then reads the file.
                send.close()
                del self._live[reader]
                reader.catch_ups += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                del self._live[reader]

    def finish(self) -> None:
        """The job has ended: fix the final length, close the file, end live channels."""
        self.ended = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for send in self._live.values():
            send.close()
        self._live.clear()

    def _subscribe(self, reader: OutputReader) -> trio.MemoryReceiveChannel[Chunk]:
        send, receive = trio.open_memory_channel[Chunk](self._live_window)
        reader.queued_bytes = 0
        self._live[reader] = send
        return receive

    def _unsubscribe(self, reader: OutputReader) -> None:
        send = self._live.pop(reader, None)
        if send is not None:
            send.close()

    @property
    def live_readers(self) -> int:
        """How many readers are on the live path right now."""
        return len(self._live)

    @asynccontextmanager
    async def follow(self, offset: int = 0, max_chunk: int = 65536) -> AsyncIterator[OutputReader]:
        """A reader of this log from ``offset``. Leaving the context (or cancellation)
        releases its channel, its file handle and its registration at once."""
        reader = OutputReader(self, offset, max_chunk)
        try:
            yield reader
        finally:
            reader.close()


class OutputReader:
    """An async iterator of output chunks (each 1..max_chunk bytes) from an offset: history
    from the file, then live data, ending once the job has ended and every byte up to the
    final length was delivered. One consumer task at a time."""

    def __init__(self, output: OutputLog, offset: int, max_chunk: int) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        if max_chunk < 1:
            raise ValueError("max_chunk must be positive")
        self._log = output
        self.offset = offset  # the next byte this reader will deliver
        self._max_chunk = max_chunk
        self._receive: trio.MemoryReceiveChannel[Chunk] | None = None
        self._pending = memoryview(b"")
        self._fd: int | None = None
        self.catch_ups = 0  # times this reader was dropped from the live path
        self.queued_bytes = 0  # bytes in its live channel (raised by the pump, lowered here)

    def __aiter__(self) -> OutputReader:
        return self

    def _take_pending(self) -> bytes:
        out = bytes(self._pending[: self._max_chunk])
        self._pending = self._pending[len(out) :]
        self.offset += len(out)
        return out

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                return self._take_pending()
            if self._receive is not None:
                try:
                    start, data = await self._receive.receive()
                    self.queued_bytes -= len(data)
                except trio.EndOfChannel:
                    # Dropped for lagging, or the job ended: continue from the file.
                    self._receive.close()
                    self._receive = None
                    continue
                skip = self.offset - start
                if skip >= len(data):
                    continue  # already delivered from the file
                if skip < 0:  # pragma: no cover - impossible by construction (see module doc)
                    log.error("output reader saw a gap at %d; reading the file", self.offset)
                    self._log._unsubscribe(self)
                    self._receive = None
                    continue
                if skip == 0 and len(data) <= self._max_chunk:
                    self.offset += len(data)
                    return data
                self._pending = memoryview(data)[skip:]
                continue
            if self.offset < self._log.length:
                size = min(max(self._max_chunk, FILE_READ_BYTES), self._log.length - self.offset)
                data = await self._read_file(size)
                if data:
                    self._pending = memoryview(data)
                    return self._take_pending()
                log.error("output log %s is shorter than recorded; stream ended", self._log.path)
                raise StopAsyncIteration
            if self._log.ended:
                raise StopAsyncIteration
            # Caught up with a live job: join the live path. No checkpoint since the length
            # check above, so the first chunk we get starts exactly at our offset.
            self._receive = self._log._subscribe(self)

    async def _read_file(self, size: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = await trio.to_thread.run_sync(
                    os.open, self._log.path, os.O_RDONLY | os.O_CLOEXEC
                )
            except FileNotFoundError:
                return b""
        return await trio.to_thread.run_sync(
            os.pread, self._fd, size, self.offset, limiter=self._log.read_limiter
        )

    def close(self) -> None:
        """Release the live registration, the channel and the file handle (idempotent)."""
        self._log._unsubscribe(self)
        if self._receive is not None:
            self._receive.close()
            self._receive = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending = memoryview(b"")
