"""The server's log: one line per record on stderr, human-readable or JSON, never blocking.

Records may carry structured fields (``extra={"event": "rpc", "identity": ...}``): the
human format shows the message (which already holds them, quoted), the JSON format puts
each field in the object. ``announce`` writes a bare line (``listening on HOST:PORT``)
through the same non-blocking path, so it keeps its place among the records.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from types import TracebackType
from typing import Literal

from jobworker.server.logsink import NonBlockingHandler

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Structured fields a record may carry, in the order a JSON line shows them.
FIELDS = ("job", "identity", "role", "method", "op", "outcome", "duration_ms", "peer", "dropped")
# h2, hpack and purerpc log every frame at DEBUG: far too much even for --log-level DEBUG.
NOISY_LOGGERS = ("h2", "hpack", "purerpc")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class OneLineFormatter(logging.Formatter):
    """``<UTC timestamp> <LEVEL> <logger> <message>``, always one line per record (a
    traceback is folded onto the same line with `` | `` separators)."""

    def converter(self, timestamp: float | None) -> time.struct_time:
        return time.gmtime(timestamp)

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        self._stamp: tuple[int, str] = (-1, "")  # one tuple: records come from threads too

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # One strftime per second, not per record: an audit line is written for every RPC.
        second = int(record.created)
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = super().formatTime(record, datefmt)
            self._stamp = (second, stamp)
        return stamp

    def formatException(self, ei: ExcInfo) -> str:
        return " | ".join(super().formatException(ei).splitlines())

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339 UTC, ms), ``level``, ``logger``,
    ``event`` (a record's ``event`` field, else its message), ``message`` when it differs,
    the structured fields the record carries, ``exception`` (the traceback text) if any."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", message),
        }
        if line["event"] != message:
            line["message"] = message
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if "job" not in line and (job := _job_of(record)) is not None:
            line["job"] = job
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _job_of(record: logging.LogRecord) -> str | None:
    """The engine's lines about one job start with ``job <id>``: that id, as a field."""
    if (
        isinstance(record.msg, str)
        and record.msg.startswith("job %s")
        and isinstance(record.args, tuple)
        and record.args
    ):
        return str(record.args[0])
    return None


_handler: NonBlockingHandler | None = None


def setup_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every record to stderr through a NonBlockingHandler, in ``log_format``."""
    global _handler  # noqa: PLW0603 (one log per process, as logging's own root)
    handler = NonBlockingHandler(sys.stderr.fileno())
    handler.setFormatter(JsonFormatter() if log_format == "json" else OneLineFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No format of ours shows the caller's file and line, thread or process: skip finding
    # them for every record (logging's documented optimisations; an audit line per RPC).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))
    _handler = handler


def announce(line: str, event: str = "announce", level: int = logging.INFO) -> None:
    """Write ``line`` to the log's stream after the records before it: as it is in the text
    format (``listening on HOST:PORT``), as an object with ``event`` in the JSON format."""
    if _handler is None:
        print(line, file=sys.stderr, flush=True)
    elif isinstance(_handler.formatter, JsonFormatter):
        record = logging.LogRecord("jobworker.server", level, __file__, 0, line, None, None)
        record.event = event
        _handler.handle(record)
    else:
        _handler.write_raw(line)
