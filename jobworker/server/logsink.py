"""A logging handler that never blocks its caller: the server's event loop.

Writing to stderr blocks once a pipe's reader stops reading (or a terminal is paused): done on
the event loop, one stuck reader would freeze every RPC, new connections and the signal
watcher. So ``emit`` only appends the formatted line to a bounded in-memory buffer, and one
writer thread does the blocking ``write``. When the buffer is full, new lines are dropped and
counted; the count is written as one line, ``N log lines dropped``, where the gap is, as soon
as the sink takes lines again.

Why a thread rather than non-blocking writes: O_NONBLOCK is a property of the open file
description, which stderr shares with whoever started the server (a shell's terminal, a
supervisor's pipe); setting it would break their writes too.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time

LOG_BUFFER_BYTES = 256 * 1024  # lines waiting for a slow sink (a few thousand); beyond: dropped
FLUSH_TIMEOUT_S = 2.0  # at exit, a stuck sink may hold up the process only this long
# Once woken, the writer lets lines gather this long before it writes them: one wakeup (and one
# handover of the GIL) per batch instead of per line, at a cost in latency nobody reads logs at.
BATCH_S = 0.005
_WRITE_WAIT_S = 1.0  # an fd someone else made non-blocking: wait for room this long per try
DROPPED_MESSAGE = "%d log lines dropped"


class NonBlockingHandler(logging.Handler):
    """Formats records on the caller's thread and writes them to ``fd`` from a writer thread.

    ``emit`` never blocks on the sink (only briefly on the buffer's lock). ``write_raw``
    queues an unformatted line the same way (``listening on HOST:PORT``). ``close`` waits at
    most FLUSH_TIMEOUT_S for the buffer to drain; the writer is a daemon thread, so a sink
    that never drains cannot keep the process alive.
    """

    def __init__(self, fd: int, *, max_bytes: int = LOG_BUFFER_BYTES) -> None:
        super().__init__()
        self._fd = fd
        self._max_bytes = max_bytes
        self._cond = threading.Condition(threading.Lock())
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._writing = False
        self._dropped = 0
        self._broken = False  # the sink is gone (EPIPE, EBADF): drop silently
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines dropped and not yet reported."""
        with self._cond:
            return self._dropped

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._put(line)

    def write_raw(self, line: str) -> None:
        """Queue ``line`` as it is (plus a newline), under the same rules as a record."""
        self._put(line)

    def _put(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        with self._cond:
            if self._broken:
                return
            if self._buffered + len(data) > self._max_bytes:
                self._dropped += 1
                return
            self._report_dropped_locked()
            self._buffer.append(data)
            self._buffered += len(data)
            if not self._writing:  # the writer is parked (or about to look): wake it once
                self._writing = True
                self._cond.notify_all()

    def _report_dropped_locked(self) -> None:
        """Queue the ``N log lines dropped`` line (beyond the bound: it is one line)."""
        if not self._dropped:
            return
        record = logging.LogRecord(
            "jobworker.server.log", logging.WARNING, __file__, 0, DROPPED_MESSAGE,
            (self._dropped,), None,
        )  # fmt: skip
        record.event = "log_lines_dropped"
        record.dropped = self._dropped
        self._dropped = 0
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buffer:
                    if self._dropped and not self._broken:
                        self._report_dropped_locked()  # the sink drained: say what was lost
                        continue
                    self._writing = False
                    self._cond.notify_all()
                    self._cond.wait()
                self._writing = True
            time.sleep(BATCH_S)
            with self._cond:
                chunk = b"".join(self._buffer)
                self._buffer.clear()
                self._buffered = 0
            if not self._write_all(chunk):
                with self._cond:
                    self._broken = True
                    self._buffer.clear()
                    self._buffered = 0

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                select.select([], [self._fd], [], _WRITE_WAIT_S)
                continue
            except OSError:
                return False
            view = view[written:]
        return True

    def flush(self) -> None:
        """Wait (at most FLUSH_TIMEOUT_S) until every queued line has been written."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        with self._cond:
            while (self._buffer or self._writing or self._dropped) and not self._broken:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.notify_all()
                self._cond.wait(remaining)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flush()
        super().close()
