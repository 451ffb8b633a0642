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

When the disk refuses an append (full, or failing), the pump goes on draining
the pipe: what was not written is dropped and counted, every later append is
tried again (so output is kept as soon as there is room), and the first write
after a gap is a marker, ``[jobworker: N bytes of output lost: <why>]``, so the
gap is visible where it happened. The length only ever counts bytes the file
holds. A marker still owed when the job ends is written then, with the disk
reserve released if need be.

An output cap (``cap``) keeps the first ``cap`` bytes the job writes: the first byte beyond
it is replaced by one marker, ``[jobworker: output truncated at N bytes]``, and the rest is
counted (``written_bytes``) but never written. The job runs on; readers get the kept bytes,
the marker, and their end when the job ends.

Memory per reader is bounded by LIVE_WINDOW_BYTES of queued pump chunks (or a
single larger chunk) plus the one chunk or file read (FILE_READ_BYTES) it is
delivering, whatever the size of the output.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from jobworker.engine.disk import (
    DiskReserve,
    UnsafeFile,
    check_own_regular_file,
    is_disk_full,
    open_safely,
    run_with_reserve,
)
from jobworker.errors import JobNotFound, OutputLost

__all__ = [
    "LIVE_WINDOW_CHUNKS",
    "OutputLog",
    "OutputReader",
    "loss_marker",
    "truncated_marker",
    "truncated_summary",
]

log = logging.getLogger("jobworker.engine")

# Chunks a live reader may have queued before it is dropped to the file path: 16 x 64 KiB
# = 1 MiB per reader at most, enough to absorb scheduling jitter of a healthy reader.
LIVE_WINDOW_CHUNKS = 16
# The same window in bytes: pump chunks range from a byte to a full pipe (1 MiB, see
# engine.supervision), so the chunk count alone does not bound memory. One chunk is always
# accepted into an empty queue.
LIVE_WINDOW_BYTES = 1024 * 1024
# Catch-up reads from the file: one thread round trip per 256 KiB instead of one per 64 KiB
# chunk (a thread hop costs about as much CPU as sending a chunk); delivered in max_chunk
# slices. 100 readers catching up at once hold 25 MiB.
FILE_READ_BYTES = 256 * 1024
FILE_READ_THREADS = 2  # per output log (see OutputLog.read_limiter)

Chunk = tuple[int, bytes]  # (offset of its first byte, data)


DISK_FULL_CAUSE = "data disk full"


def loss_marker(lost: int, cause: str) -> bytes:
    """The line written into the output where ``lost`` bytes are missing."""
    return f"\n[jobworker: {lost} bytes of output lost: {cause}]\n".encode()


def truncated_summary(cap: int) -> str:
    """The clause a capped job's reason ends with: ``output truncated at N bytes``."""
    return f"output truncated at {cap} bytes"


def truncated_marker(cap: int) -> bytes:
    """The line that ends the output of a job that wrote more than ``cap`` bytes."""
    return f"\n[jobworker: {truncated_summary(cap)}]\n".encode()


def _write_some(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write as much of ``data`` as the file takes: (bytes written, the error that stopped it)."""
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, memoryview(data)[done:])
        except OSError as exc:
            return done, exc
    return done, None


# A gap ends (marker, then output again) once the disk has this much room: far more than a
# marker, so the marker and the output after it fit, without ending the gap for a lone page.
RESUME_FREE_BYTES = 1024 * 1024


def _has_room(fd: int) -> bool:
    try:
        info = os.fstatvfs(fd)
    except OSError:
        return True  # let the write itself say what is wrong
    return info.f_bavail * info.f_frsize >= RESUME_FREE_BYTES


def _cause(exc: OSError) -> str:
    return DISK_FULL_CAUSE if is_disk_full(exc) else (exc.strerror or str(exc)).lower()


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
        job_id: str = "",
        missing: bool = False,
        reserve: DiskReserve | None = None,
        cap: int | None = None,
        written: int | None = None,
    ) -> None:
        self.path = path
        self.job_id = job_id
        self.missing = missing  # a loaded job whose file is gone: readers get OutputLost
        self.removed = False  # the job is being deleted: readers end at their next message
        self._reserve = reserve
        self._live_window = live_window
        self.length = length
        self.ended = ended
        self.cap = cap  # bytes of the job's output kept at most (None: all of them)
        # Bytes the job wrote: what ``length`` holds, plus what the cap or the disk dropped,
        # minus the marker lines (a loaded log: as its record says).
        self.written_bytes = length if written is None else written
        self._kept = 0  # bytes of the job's output offered to the file (at most ``cap``)
        self.truncated = False  # the job wrote more than ``cap``: the rest was discarded
        self._fd: int | None = None
        self.lost_bytes = 0  # dropped because the disk refused them
        self.loss_cause = ""  # why, for the first loss ("data disk full")
        self._gap = 0  # bytes lost since the last marker was begun
        self._marker_rest = b""  # the part of a begun marker not yet written
        self._live: dict[OutputReader, trio.MemorySendChannel[Chunk]] = {}
        # Catch-up reads of this log in flight at once: 100 readers catching up together
        # would otherwise take 40 threads (trio's default limit), each with its buffer and
        # its own malloc arena: 110-140 MB of server RSS with 100 readers (bench fan-out).
        self.read_limiter = trio.CapacityLimiter(FILE_READ_THREADS)

    def open_append(self) -> None:
        """Create the file and open it for appending (blocking: call from a thread)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)

    @property
    def summary(self) -> str:
        """What the job's reason adds about its output (clauses joined by "; "): the loss
        (``loss_summary``), the truncation (``output truncated at N bytes``); "" if none."""
        clauses = [self.loss_summary]
        if self.truncated and self.cap is not None:
            clauses.append(truncated_summary(self.cap))
        return "; ".join(clause for clause in clauses if clause)

    @property
    def loss_summary(self) -> str:
        """``N bytes of output lost: <why>``, or "" if nothing was lost."""
        if not self.lost_bytes:
            return ""
        return f"{self.lost_bytes} bytes of output lost: {self.loss_cause}"

    def _lose(self, count: int, exc: OSError) -> None:
        if not self.lost_bytes:
            log.warning(
                "job %s: output lost: cannot write %s (%s); dropping output until it can",
                self.job_id,
                self.path,
                exc.strerror or exc,
            )
            self.loss_cause = _cause(exc)
        self.lost_bytes += count
        self._gap += count

    def _write(self, fd: int, data: bytes, *, force: bool = False) -> bytes:
        """Write the marker owed for a gap (if any), then ``data``; return the bytes that
        reached the file, in order (blocking: runs in a thread, one at a time). During a gap
        nothing is tried until the disk has RESUME_FREE_BYTES free (unless ``force``): one
        outage then makes one gap and one marker, not a marker per page that came free."""
        if (self._gap or self._marker_rest) and not force and not _has_room(fd):
            self._gap += len(data)
            self.lost_bytes += len(data)
            return b""
        if self._gap and not self._marker_rest:
            self._marker_rest, self._gap = loss_marker(self._gap, self.loss_cause), 0
        written = b""
        if self._marker_rest:
            done, error = _write_some(fd, self._marker_rest)
            written, self._marker_rest = self._marker_rest[:done], self._marker_rest[done:]
            if error is not None:
                self._lose(len(data), error)  # the marker must come first: data waits for it
                return written
            log.info("job %s: output is written again after a loss", self.job_id)
        done, error = _write_some(fd, data)
        if error is not None:
            self._lose(len(data) - done, error)
        return written + data[:done]

    async def append(self, data: bytes) -> None:
        """Write ``data`` at the end of the file, then publish it. Never waits for a reader,
        nor for the disk to have room (what it refuses is dropped, counted and marked).

        The write runs in a thread and is not abandoned on cancellation, so the length
        always matches what the file holds.
        """
        if self._fd is None:
            return
        self.written_bytes += len(data)
        if self.cap is not None:
            data = self._capped(data, self.cap)
            if not data:
                return
        data = await trio.to_thread.run_sync(self._write, self._fd, data)
        if data:
            self._publish(data)

    def _capped(self, data: bytes, cap: int) -> bytes:
        """What of ``data`` goes to the file under the cap: all of it while it fits; the
        part that fits and the marker for the first chunk that does not; nothing after."""
        if self.truncated:
            return b""
        room = cap - self._kept
        if len(data) <= room:
            self._kept += len(data)
            return data
        self._kept = cap
        self.truncated = True
        log.info("job %s: output truncated at %d bytes", self.job_id, cap)
        return data[:room] + truncated_marker(cap)

    async def write_owed_marker(self) -> None:
        """At the job's end: write the marker still owed for a gap, releasing the disk
        reserve if the disk is full. Failing that, the loss stays in the job's reason."""
        if self._fd is None or not (self._gap or self._marker_rest):
            return
        fd = self._fd
        published: list[bytes] = []

        def write() -> None:
            # The rest of a begun marker, then the one owed for a gap that followed it.
            for _ in range(2):
                published.append(self._write(fd, b"", force=True))
                if self._marker_rest:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if not self._gap:
                    return

        try:
            await trio.to_thread.run_sync(run_with_reserve, self._reserve, write)
        except OSError:
            log.warning("job %s: no room for the output-loss marker", self.job_id)
        for data in published:
            if data:
                self._publish(data)

    def _publish(self, data: bytes) -> None:
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
    async def follow(
        self, offset: int = 0, max_chunk: int = 65536, *, snapshot: bool = False
    ) -> AsyncIterator[OutputReader]:
        """A reader of this log from ``offset`` (with ``snapshot``: up to the length the log
        has now, what is there so far). Leaving the context (or cancellation) releases its
        channel, its file handle and its registration at once."""
        reader = OutputReader(self, offset, max_chunk, snapshot=snapshot)
        try:
            yield reader
        finally:
            reader.close()


class OutputReader:
    """An async iterator of output chunks (each 1..max_chunk bytes) from an offset: history
    from the file, then live data, ending once the job has ended and every byte up to the
    final length was delivered (with ``snapshot``: every byte up to the length when the
    reader was made, never live data). Raises OutputLost if the file is missing, shorter
    than its length, or no longer a regular file of ours; once its job is being deleted, it
    ends at the next message (JobNotFound, or the end if nothing was left to deliver). One
    consumer task at a time."""

    def __init__(
        self, output: OutputLog, offset: int, max_chunk: int, *, snapshot: bool = False
    ) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        if max_chunk < 1:
            raise ValueError("max_chunk must be positive")
        self._log = output
        self.offset = offset  # the next byte this reader will deliver
        self._max_chunk = max_chunk
        self._end = output.length if snapshot else None  # where a snapshot stops
        self._receive: trio.MemoryReceiveChannel[Chunk] | None = None
        self._pending = memoryview(b"")
        self._fd: int | None = None
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self.catch_ups = 0  # times this reader was dropped from the live path
        self.queued_bytes = 0  # bytes in its live channel (raised by the pump, lowered here)

    def __aiter__(self) -> OutputReader:
        return self

    def _end_if_removed(self) -> None:
        """The job is being deleted: end here, between two messages. StopAsyncIteration if
        every byte this reader was to deliver has been, JobNotFound otherwise."""
        if self._log.removed:
            end = self._log.length if self._end is None else self._end
            if self.offset >= end:
                raise StopAsyncIteration
            raise JobNotFound(self._log.job_id)

    def _take_pending(self) -> bytes:
        out = bytes(self._pending[: self._max_chunk])
        self._pending = self._pending[len(out) :]
        self.offset += len(out)
        return out

    async def __anext__(self) -> bytes:
        while True:
            self._end_if_removed()
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
            # A snapshot's end is at most the length: it reads the file, never the live path.
            end = self._log.length if self._end is None else self._end
            if self.offset < end:
                size = min(max(self._max_chunk, FILE_READ_BYTES), end - self.offset)
                read = await self._read_file(size)
                if read:
                    self._pending = memoryview(read)
                    return self._take_pending()
                log.error("output log %s is shorter than recorded", self._log.path)
                raise OutputLost(self._log.job_id, "is shorter than recorded")
            if self._log.missing:
                raise OutputLost(self._log.job_id)
            if self._log.ended or self._end is not None:
                raise StopAsyncIteration
            # Caught up with a live job: join the live path. No checkpoint since the length
            # check above, so the first chunk we get starts exactly at our offset.
            self._receive = self._log._subscribe(self)

    async def _read_file(self, size: int) -> bytes | memoryview:
        if self._fd is None:
            self._fd = await trio.to_thread.run_sync(self._open_file)
        if self._nowait:
            # What a reader catches up on was mostly written moments ago and is in the page
            # cache: read it here, without a thread hop, if the kernel can do so without
            # waiting for the disk (RWF_NOWAIT); a miss goes to a thread as before. One
            # message at a time: without the hop there is nothing to amortise, and a hundred
            # readers catching up at once each hold one chunk, not a read's worth.
            buffer = bytearray(min(size, self._max_chunk))
            try:
                got = os.preadv(self._fd, [buffer], self.offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError:  # a file system without RWF_NOWAIT: threads from now on
                self._nowait = False
                got = 0
            if got:
                await trio.lowlevel.checkpoint()
                return memoryview(buffer)[:got]
        return await trio.to_thread.run_sync(
            os.pread, self._fd, size, self.offset, limiter=self._log.read_limiter
        )

    def _open_file(self) -> int:
        """Open the log without following a symlink or blocking on a fifo (a job may have
        replaced it); raise OutputLost if it is gone or not a regular file of ours."""
        path = self._log.path
        try:
            fd = open_safely(path)
        except OSError as exc:
            log.warning("job %s: cannot open its output log %s: %s", self._log.job_id, path, exc)
            raise OutputLost(self._log.job_id) from None
        try:
            check_own_regular_file(fd)
        except UnsafeFile as exc:
            os.close(fd)
            log.warning("job %s: output log %s refused: %s", self._log.job_id, path, exc)
            raise OutputLost(self._log.job_id) from None
        return fd

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
