"""Job records on disk: ``<data-dir>/jobs/<id>/job.json`` plus the job's output and scratch dir.

Every function here is blocking file work: the engine calls them through
``trio.to_thread.run_sync``. Records are written atomically (temp file in the
same directory, fsync, rename, fsync of the directory), so a crash leaves
either the old record or the new one, never a torn file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobworker.engine.model import JobRecord, JobStatus, Limits, Usage

__all__ = ["LOST_REASON", "JobStore", "LoadedJobs", "record_from_json", "record_to_json"]

log = logging.getLogger("jobworker.engine")

RECORD_FORMAT = 1  # bumped if the JSON layout ever changes incompatibly
LOST_REASON = "worker restarted while the job was running"
RECORD_NAME = "job.json"
OUTPUT_NAME = "output.log"
WORK_NAME = "work"


def record_to_json(record: JobRecord) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "id": record.id,
        "command": record.command,
        "args": list(record.args),
        "limits": {
            "cpu_percent": record.limits.cpu_percent,
            "memory_mb": record.limits.memory_mb,
            "io_bps": record.limits.io_bps,
            "pids_max": record.limits.pids_max,
        },
        "status": record.status.value,
        "start_time": record.start_time.isoformat(),
        "end_time": record.end_time.isoformat() if record.end_time else None,
        "exit_code": record.exit_code,
        "reason": record.reason,
        "usage": {
            "cpu_time_s": record.usage.cpu_time_s,
            "peak_memory_bytes": record.usage.peak_memory_bytes,
            "oom_kills": record.usage.oom_kills,
        },
        "output_bytes": record.output_bytes,
    }


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected an integer")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _time(value: object) -> dt.datetime:
    moment = dt.datetime.fromisoformat(_str(value))
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment


def record_from_json(data: dict[str, Any]) -> JobRecord:
    """Parse a stored record. Raises KeyError/TypeError/ValueError if it is malformed."""
    if data.get("format") != RECORD_FORMAT:
        raise ValueError(f"unknown record format {data.get('format')!r}")
    limits = data["limits"]
    usage = data.get("usage") or {}
    cpu_time = usage.get("cpu_time_s")
    peak = usage.get("peak_memory_bytes")
    exit_code = data.get("exit_code")
    end_time = data.get("end_time")
    return JobRecord(
        id=_str(data["id"]),
        command=_str(data["command"]),
        args=tuple(_str(arg) for arg in data["args"]),
        limits=Limits(
            cpu_percent=_int(limits["cpu_percent"]),
            memory_mb=_int(limits["memory_mb"]),
            io_bps=_int(limits["io_bps"]),
            pids_max=_int(limits["pids_max"]),
        ),
        status=JobStatus(data["status"]),
        start_time=_time(data["start_time"]),
        end_time=None if end_time is None else _time(end_time),
        exit_code=None if exit_code is None else _int(exit_code),
        reason=_str(data.get("reason", "")),
        usage=Usage(
            cpu_time_s=None if cpu_time is None else float(cpu_time),
            peak_memory_bytes=None if peak is None else _int(peak),
            oom_kills=_int(usage.get("oom_kills", 0)),
        ),
        output_bytes=_int(data.get("output_bytes", 0)),
    )


def _read_record(path: Path, job_id: str) -> JobRecord:
    record = record_from_json(json.loads(path.read_bytes()))
    if record.id != job_id:
        raise ValueError(f"record says id {record.id!r}")
    return record


@dataclass(frozen=True)
class LoadedJobs:
    """What a data directory held at start: readable records (running ones already marked
    LOST and saved), their output lengths, and the highest id in use (0 if none)."""

    records: list[JobRecord]
    output_lengths: dict[str, int]
    highest_id: int


class JobStore:
    """The ``jobs/`` directory of a data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.jobs_dir = data_dir / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def output_path(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / OUTPUT_NAME

    def work_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / WORK_NAME

    def prepare(self, job_id: str) -> None:
        """Create the job's directory and its scratch ``work`` dir (fails if the id is taken)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.job_dir(job_id).mkdir(mode=0o700)
        self.work_dir(job_id).mkdir(mode=0o700)

    def save(self, record: JobRecord, *, durable: bool = True) -> None:
        """Write the record atomically (a reader sees the old or the new file, never a mix).

        ``durable`` adds the fsyncs that make it survive a power loss, not only a crash of
        the worker (~1.3 ms here). The engine skips them for the INITIALIZING and RUNNING
        records: a crash of the worker leaves them in the page cache (the restart marks the
        job LOST), a power loss takes the job's processes with it. Final records are durable.
        """
        directory = self.job_dir(record.id)
        payload = json.dumps(record_to_json(record), indent=1).encode()
        temp = directory / f".{RECORD_NAME}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / RECORD_NAME)
        if not durable:
            return
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self) -> LoadedJobs:
        """Read every record. A job recorded INITIALIZING or RUNNING is marked LOST (and saved):
        its end was never observed. Unreadable records are logged and skipped; their ids still
        count as used, as does any numeric directory name."""
        records: list[JobRecord] = []
        lengths: dict[str, int] = {}
        highest = 0
        try:
            entries = list(os.scandir(self.jobs_dir))
        except FileNotFoundError:
            return LoadedJobs(records, lengths, highest)
        numbered = [e for e in entries if e.name.isascii() and e.name.isdigit() and e.is_dir()]
        numbered.sort(key=lambda entry: int(entry.name))
        for entry in numbered:
            highest = max(highest, int(entry.name))
            path = Path(entry.path) / RECORD_NAME
            try:
                record = _read_record(path, entry.name)
            except FileNotFoundError:
                log.warning("job %s: no job record, skipped (its id stays used)", entry.name)
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("job %s: unreadable job record, skipped: %s", entry.name, exc)
                continue
            try:
                length = self.output_path(record.id).stat().st_size
            except FileNotFoundError:
                length = 0
            if not record.status.is_terminal:
                record = replace(
                    record,
                    status=JobStatus.LOST,
                    reason=LOST_REASON,
                    output_bytes=length,
                )
                log.warning("job %s: marked LOST (%s)", record.id, LOST_REASON)
                try:
                    self.save(record)
                except OSError:
                    log.exception("job %s: cannot save its LOST record", record.id)
            records.append(record)
            lengths[record.id] = length
        return LoadedJobs(records, lengths, highest)
