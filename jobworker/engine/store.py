"""Job records on disk: ``<data-dir>/jobs/<id>/job.json`` plus the job's output and scratch dir.

Every function here is blocking file work: the engine calls them through
``trio.to_thread.run_sync``. Records are written atomically (temp file in the
same directory, rename), so a crash leaves either the old record or the new
one, never a torn file; final records are also fsynced, file and directory.

A record that cannot be written (a full or failing disk) is kept in memory and
written again by ``retry_unsaved`` until it is; a newer record of the same job
replaces it. ``<data-dir>/.reserve`` holds DISK_RESERVE_BYTES that are released
when a final record or an output-loss marker finds the disk full.

The loader trusts nothing in the data dir (jobs may be able to write it): a
record or log is opened without following symlinks or blocking on fifos, must
be a regular file owned by the server's user, and a record is read with a size
cap. A record must also hold only what the server can serve (strings that are
UTF-8, numbers that fit their wire fields, timestamps that convert to UTC).
Anything else is skipped with one WARNING naming it. A save writes a temporary
file of a fresh name (created exclusively), so nothing planted in a job's
directory can make it block, follow a link or fail for good.

Ids are never reused. A deleted job's directory is renamed out of the way
(``jobs/.deleted.<id>.<random>``, which the next start removes if the delete
was cut short) and ``<data-dir>/next-id`` records, before that, the lowest id
no job has had: a restart continues after it even when the highest ids are gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from jobworker.engine.disk import (
    DiskReserve,
    UnsafeFile,
    check_own_regular_file,
    open_safely,
    run_with_reserve,
)
from jobworker.engine.model import JobRecord, JobStatus, Limits, Usage

__all__ = [
    "LOST_REASON",
    "OUTPUT_MISSING_REASON",
    "DataDirUnusable",
    "JobStore",
    "LoadedJobs",
    "record_from_json",
    "record_to_json",
]

log = logging.getLogger("jobworker.engine")

RECORD_FORMAT = 1  # bumped if the JSON layout ever changes incompatibly
LOST_REASON = "worker restarted while the job was running"
RECORD_NAME = "job.json"
OUTPUT_NAME = "output.log"
WORK_NAME = "work"
NEXT_ID_NAME = "next-id"  # in the data dir: the high-water mark of ids (see the module doc)
# A job directory being deleted: renamed to this prefix, then removed (a leftover is removed at
# the next start). Not a number, so never loaded as a job.
DELETED_PREFIX = ".deleted."
MAX_NEXT_ID_BYTES = 32  # a decimal number and a newline


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
            "io_read_bytes": record.usage.io_read_bytes,
            "io_write_bytes": record.usage.io_write_bytes,
        },
        "output_bytes": record.output_bytes,
        "written_bytes": record.written_bytes,
        "owner": record.owner,
        "timeout_s": record.timeout_s,
        "env": dict(record.env),
        "working_dir": record.working_dir,
        "request_id": record.request_id,
        "request_time": record.request_time.isoformat() if record.request_time else None,
    }


# The int32 fields of the wire (limits, exit code): a stored value beyond them could not be
# sent, and would break every listing that holds the job.
INT32 = range(-(2**31), 2**31)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected an integer")
    return value


def _int32(value: object) -> int:
    number = _int(value)
    if number not in INT32:
        raise ValueError(f"{number} does not fit a 32-bit field")
    return number


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    value.encode()  # UnicodeEncodeError for a lone surrogate ("\ud800" in the JSON)
    return value


def _env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return {_str(name): _str(text) for name, text in value.items()}


def _time(value: object) -> dt.datetime:
    moment = dt.datetime.fromisoformat(_str(value))
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.astimezone(dt.UTC)  # OverflowError at the ends of the calendar


# What decoding or interpreting one record may raise, whatever was written into it:
# ValueError (bad JSON or UTF-8, an integer of too many digits, a bad status, timestamp or
# range), KeyError (a missing field), TypeError and AttributeError (a field, or the whole
# record, of the wrong type), RecursionError (nesting deeper than the decoder's recursion
# limit: a few KiB of "["), OverflowError (a number too large for a float, a date that does
# not convert to UTC).
RECORD_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    RecursionError,
    OverflowError,
)


_UNREADABLE: tuple[type[Exception], ...] = (OSError, *RECORD_ERRORS)  # reading, then parsing


def record_from_json(data: dict[str, Any]) -> JobRecord:
    """Parse a stored record. Raises one of RECORD_ERRORS if it is malformed."""
    if data.get("format") != RECORD_FORMAT:
        raise ValueError(f"unknown record format {data.get('format')!r}")
    limits = data["limits"]
    usage = data.get("usage") or {}
    cpu_time = usage.get("cpu_time_s")
    peak = usage.get("peak_memory_bytes")
    io_read = usage.get("io_read_bytes")  # absent from records of before IO was measured
    io_write = usage.get("io_write_bytes")
    exit_code = data.get("exit_code")
    end_time = data.get("end_time")
    output_bytes = _int(data.get("output_bytes", 0))
    request_time = data.get("request_time")  # absent from records of before request ids
    return JobRecord(
        id=_str(data["id"]),
        command=_str(data["command"]),
        args=tuple(_str(arg) for arg in data["args"]),
        limits=Limits(
            cpu_percent=_int32(limits["cpu_percent"]),
            memory_mb=_int32(limits["memory_mb"]),
            io_bps=_int32(limits["io_bps"]),
            pids_max=_int(limits["pids_max"]),
        ),
        status=JobStatus(data["status"]),
        start_time=_time(data["start_time"]),
        end_time=None if end_time is None else _time(end_time),
        exit_code=None if exit_code is None else _int32(exit_code),
        reason=_str(data.get("reason", "")),
        usage=Usage(
            cpu_time_s=None if cpu_time is None else float(cpu_time),
            peak_memory_bytes=None if peak is None else _int(peak),
            oom_kills=_int(usage.get("oom_kills", 0)),
            io_read_bytes=None if io_read is None else _int(io_read),
            io_write_bytes=None if io_write is None else _int(io_write),
        ),
        output_bytes=output_bytes,
        # Records from before output caps: the job wrote what its log holds.
        written_bytes=_int(data.get("written_bytes", output_bytes)),
        owner=_str(data.get("owner", "")),
        # Records from before time limits, env and working directories: none of them.
        timeout_s=_int32(data.get("timeout_s", 0)),
        env=_env(data.get("env", {})),
        working_dir=_str(data.get("working_dir", "")),
        request_id=_str(data.get("request_id", "")),
        request_time=None if request_time is None else _time(request_time),
    )


class DataDirUnusable(Exception):
    """Raised at start when ``<data-dir>/jobs`` is not a directory this server can use."""


# A record is a few hundred bytes plus the job's arguments and env (bounded by validation):
# anything larger was not written by us.
MAX_RECORD_BYTES = 2 * 1024 * 1024
# Temporary files of atomic writes: ".job.json.<random>.tmp" (and ".job.json.tmp", the name
# of older saves), ".next-id.<random>.tmp".
TEMP_SUFFIX = ".tmp"


def _is_temporary(name: str, final_name: str = RECORD_NAME) -> bool:
    return name.startswith(f".{final_name}.") and name.endswith(TEMP_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(directory: Path, name: str, payload: bytes, *, durable: bool) -> None:
    """Replace ``directory/name`` by ``payload`` atomically: a temporary file of a fresh name
    (``.<name>.<random>.tmp``, created exclusively, never following a link), written, renamed
    over. ``durable`` fsyncs the file, then the directory after the rename. On failure the
    temporary file is removed and OSError raised: the previous file is still in place."""
    temp = directory / f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        _fsync_dir(directory)


def _remove_tree(path: str | Path) -> None:
    """Remove ``path`` (a directory: fd-based, never following a symlink out of it; anything
    else: unlinked). Raises OSError, or RecursionError for a tree nested too deep."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_temporaries(directory: Path, label: str, final_name: str = RECORD_NAME) -> None:
    """Remove what saves of ``final_name`` cut short by a crash left in ``directory`` (a job's,
    or the data dir), and whatever else carries such a name (a job may have planted a
    directory, a fifo, a symlink): never followed out of the directory. What cannot be
    removed is left, with a WARNING."""
    try:
        with os.scandir(directory) as entries:
            found = [entry for entry in entries if _is_temporary(entry.name, final_name)]
    except OSError as exc:
        log.warning("%s: cannot look for temporary files in %s: %s", label, directory, exc)
        return
    for entry in found:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # fd-based: refuses to follow a symlink
            else:
                os.unlink(entry.path)
        except (OSError, RecursionError) as exc:  # RecursionError: a tree nested too deep
            log.warning("%s: cannot remove %s: %s", label, entry.path, exc)


def _read_record(path: Path, job_id: str) -> JobRecord:
    try:
        fd = open_safely(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("a symbolic link") from None
        raise
    try:
        check_own_regular_file(fd, max_bytes=MAX_RECORD_BYTES)
        data = os.read(fd, MAX_RECORD_BYTES + 1)  # capped even if it grows meanwhile
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        raise UnsafeFile(f"more than a record can be ({MAX_RECORD_BYTES} bytes)")
    record = record_from_json(json.loads(data))  # RECORD_ERRORS
    if record.id != job_id:
        raise ValueError(f"record says id {record.id!r}")
    return record


def _parse_next_id(fd: int) -> int:
    check_own_regular_file(fd, max_bytes=MAX_NEXT_ID_BYTES)
    text = os.read(fd, MAX_NEXT_ID_BYTES + 1).decode("ascii").strip()
    if not text.isdigit():
        raise ValueError("not a number")
    return int(text)


def _output_length(path: Path) -> tuple[int | None, str]:
    """The size of a job's output log, or (None, why) if it is missing or not a file of ours."""
    try:
        fd = open_safely(path)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, "a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
    try:
        return check_own_regular_file(fd).st_size, ""
    except UnsafeFile as exc:
        return None, str(exc)
    finally:
        os.close(fd)


OUTPUT_MISSING_REASON = "its output log is missing"


@dataclass(frozen=True)
class LoadedJobs:
    """What a data directory held at start: readable records (running ones already marked
    LOST and saved), their output lengths (None: the log is missing or unusable), the
    highest id in use (0 if none), and the ids this load itself marked LOST."""

    records: list[JobRecord]
    output_lengths: dict[str, int | None]
    highest_id: int
    found_lost: list[str] = field(default_factory=list)  # ids this load marked LOST


class JobStore:
    """The ``jobs/`` directory of a data dir, and the records not yet written to it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.reserve = DiskReserve(data_dir)
        # job id -> (record, durable) that could not be written yet; _locks serialise the
        # writes of one job (the retry thread and the job's own save).
        self._unsaved: dict[str, tuple[JobRecord, bool]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._table_lock = threading.Lock()
        self._next_id_saved = 0  # the high-water mark on disk (read_next_id, then delete)
        self._next_id_lock = threading.Lock()

    def _lock_for(self, job_id: str) -> threading.Lock:
        with self._table_lock:
            return self._locks.setdefault(job_id, threading.Lock())

    def keep(self, record: JobRecord, *, durable: bool = True) -> None:
        """``save`` the record (releasing the reserve if a final record finds the disk
        full); if that fails, keep it for ``retry_unsaved`` and re-raise the OSError."""
        with self._lock_for(record.id):
            try:
                if durable:
                    run_with_reserve(self.reserve, partial(self.save, record))
                else:
                    self.save(record, durable=False)
            except OSError:
                with self._table_lock:
                    self._unsaved[record.id] = (record, durable)
                raise
            with self._table_lock:
                self._unsaved.pop(record.id, None)

    @property
    def unsaved(self) -> list[str]:
        """Ids of the jobs whose latest record is not on disk yet."""
        with self._table_lock:
            return sorted(self._unsaved, key=int)

    def retry_unsaved(self) -> int:
        """Write every record kept by a failed ``keep``; return how many are still unsaved."""
        for job_id in self.unsaved:
            with self._lock_for(job_id):
                with self._table_lock:
                    entry = self._unsaved.get(job_id)  # the newest, read under the job's lock
                if entry is None:
                    continue  # saved by its job meanwhile
                record, durable = entry
                try:
                    run_with_reserve(self.reserve, partial(self.save, record, durable=durable))
                except FileNotFoundError:
                    # Its directory was never made (the disk was full at create) or is gone.
                    log.warning("job %s: its directory is gone; record not saved", job_id)
                    with self._table_lock:
                        self._unsaved.pop(job_id, None)
                    continue
                except OSError as exc:
                    log.debug("job %s: record still unsaved: %s", job_id, exc)
                    continue
                with self._table_lock:
                    self._unsaved.pop(job_id, None)
                log.info("job %s: record saved after an earlier failure", job_id)
        return len(self.unsaved)

    def free_bytes(self) -> tuple[int, int]:
        """(bytes free for us, total bytes) of the filesystem holding the data dir."""
        info = os.statvfs(self.data_dir)
        return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def output_path(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / OUTPUT_NAME

    def work_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / WORK_NAME

    def prepare(self, job_id: str, owner: tuple[int, int] | None = None) -> None:
        """Create the job's directory and its scratch ``work`` dir (fails if the id is taken),
        the work dir owned by ``owner`` (uid, gid) when the job runs as another user.

        The job's directory is searchable by anyone (0711): a job user that shares the
        host's mount namespace reaches its work dir by path. Nothing in it is readable by
        others (records and logs are 0600)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.job_dir(job_id).mkdir(mode=0o711)
        os.chmod(self.job_dir(job_id), 0o711)  # noqa: S103 (search only; mkdir's mode is cut by the umask)
        work = self.work_dir(job_id)
        work.mkdir(mode=0o700)
        if owner is not None:
            os.chown(work, *owner)

    def discard(self, job_id: str) -> bool:
        """Remove what ``prepare`` (and a first save) made for a job that never started;
        True once nothing of it is on disk."""
        try:
            shutil.rmtree(self.job_dir(job_id))
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("job %s: cannot remove %s: %s", job_id, self.job_dir(job_id), exc)
            return False
        return True

    def read_next_id(self) -> int:
        """The high-water mark of ids in ``<data-dir>/next-id``: no job ever had this id or a
        higher one (0 if the file does not exist). Removes temporary files a crash left.
        Raises DataDirUnusable if the file is there but is not a number we wrote: ids could
        no longer be kept unique."""
        path = self.data_dir / NEXT_ID_NAME
        _remove_temporaries(self.data_dir, "data dir", NEXT_ID_NAME)
        try:
            fd = open_safely(path)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            why = "a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            raise DataDirUnusable(f"cannot use {path}: {why}") from None
        try:
            value = _parse_next_id(fd)
        except (OSError, UnsafeFile, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise DataDirUnusable(f"cannot use {path}: {exc}") from None
        finally:
            os.close(fd)
        with self._next_id_lock:
            self._next_id_saved = max(self._next_id_saved, value)
        return value

    def _save_next_id(self, next_id: int) -> None:
        """Raise the high-water mark on disk to ``next_id`` (durably) unless it is there."""
        with self._next_id_lock:
            if next_id <= self._next_id_saved:
                return
            payload = f"{next_id}\n".encode()
            write = partial(_write_atomically, self.data_dir, NEXT_ID_NAME, payload, durable=True)
            run_with_reserve(self.reserve, write)
            self._next_id_saved = next_id

    def delete(self, job_id: str, next_id: int) -> bool:
        """Remove a job's directory (record, output, work dir) for good; ``next_id`` is the
        lowest id no job has had yet, recorded first (``<data-dir>/next-id``) so that no
        later start gives this id (or any lower) again.

        The directory is renamed away (``jobs/.deleted.<id>.<random>``) and ``jobs/`` fsynced:
        from then on the job is gone, also after a crash or a power loss. Then the renamed
        tree is removed without following any symlink in it; what cannot be removed is left,
        with a WARNING, for the next start to remove. Returns False in that case.
        Raises OSError (the job's files are then untouched) if the mark or the rename fails.
        A failing fsync after the rename is logged: the job is gone for this server, and a
        power loss right then may bring it back at the next start (its id stays unique).
        Blocking: run in a thread."""
        self._save_next_id(next_id)
        trash = self.jobs_dir / f"{DELETED_PREFIX}{job_id}.{secrets.token_hex(8)}"
        with self._lock_for(job_id):
            try:
                os.rename(self.job_dir(job_id), trash)
                renamed = True
            except FileNotFoundError:
                renamed = False  # never made (its start failed before its files), or gone
            if renamed:
                try:
                    _fsync_dir(self.jobs_dir)
                except OSError as exc:  # renamed all the same: the job is gone from now on
                    log.warning("job %s: deleted, but fsync of jobs/ failed: %s", job_id, exc)
            with self._table_lock:
                self._unsaved.pop(job_id, None)  # a record still owed has nowhere to go
                self._locks.pop(job_id, None)
        if not renamed:
            return True
        try:
            _remove_tree(trash)
        except (OSError, RecursionError) as exc:  # RecursionError: a tree nested too deep
            log.warning("job %s: cannot remove %s (the next start will): %s", job_id, trash, exc)
            return False
        return True

    def save(self, record: JobRecord, *, durable: bool = True) -> None:
        """Write the record atomically (a reader sees the old or the new file, never a mix).

        ``durable`` adds the fsyncs (of the file, then of its directory after the rename)
        that make it survive a power loss, not only a crash of the worker. The engine skips
        them for the INITIALIZING and RUNNING records: a crash of the worker leaves them in
        the page cache (the restart marks the job LOST), a power loss takes the job's
        processes with it. Final records are durable. On failure the temporary file is
        removed and OSError raised: the previous record is still in place.

        The temporary file has a fresh random name and is created exclusively: whatever a
        job planted in the directory is never opened (a fifo would block the open, a symlink
        lead out of the data dir, a directory refuse it for good).
        """
        payload = json.dumps(record_to_json(record), indent=1).encode()
        _write_atomically(self.job_dir(record.id), RECORD_NAME, payload, durable=durable)

    def scan(self) -> tuple[list[str], int]:
        """The job directories to load, in id order, and the highest id in use (any numeric
        name counts, usable or not). Creates ``jobs/`` if missing; raises DataDirUnusable if
        it is not a directory we can read."""
        try:
            info = os.lstat(self.jobs_dir)
        except FileNotFoundError:
            try:
                self.jobs_dir.mkdir(parents=True, mode=0o711)
                os.chmod(self.jobs_dir, 0o711)  # noqa: S103 (search only; the umask cuts mkdir's)
            except OSError as exc:
                raise DataDirUnusable(
                    f"cannot create {self.jobs_dir}: {exc.strerror or exc}"
                ) from None
            return [], 0
        except OSError as exc:
            raise DataDirUnusable(f"cannot use {self.jobs_dir}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise DataDirUnusable(f"{self.jobs_dir} is not a directory")
        try:
            entries = list(os.scandir(self.jobs_dir))
        except OSError as exc:
            raise DataDirUnusable(f"cannot read {self.jobs_dir}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith(DELETED_PREFIX):  # a delete cut short by a crash
                try:
                    _remove_tree(entry.path)
                except (OSError, RecursionError) as exc:
                    log.warning("cannot remove %s, left by a delete: %s", entry.path, exc)
        numbered = [e for e in entries if e.name.isascii() and e.name.isdigit()]
        highest = max((int(e.name) for e in numbered), default=0)
        names: list[str] = []
        for entry in numbered:
            if entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
            else:
                log.warning(
                    "job %s: %s is not a directory, skipped (its id stays used)",
                    entry.name,
                    entry.path,
                )
        names.sort(key=int)
        return names, highest

    def load_some(self, names: list[str]) -> LoadedJobs:
        """Read the records of these job directories (blocking). A job recorded INITIALIZING
        or RUNNING is marked LOST (and saved): its end was never observed. A record that is
        unreadable, not a regular file owned by us, or larger than MAX_RECORD_BYTES is
        skipped with one WARNING; its id stays used. Leftover temporary records are removed.
        A LOST record the disk refuses is kept for the retry (JobStore.keep), with a WARNING.
        """
        records: list[JobRecord] = []
        lengths: dict[str, int | None] = {}
        found_lost: list[str] = []
        for name in names:
            directory = self.jobs_dir / name
            _remove_temporaries(directory, f"job {name}")
            path = directory / RECORD_NAME
            try:
                record = _read_record(path, name)
            except FileNotFoundError:
                log.warning("job %s: no job record, skipped (its id stays used)", name)
                continue
            except UnsafeFile as exc:
                log.warning("job %s: job record %s refused (%s), skipped", name, path, exc)
                continue
            except _UNREADABLE as exc:
                log.warning("job %s: unreadable job record %s, skipped: %s", name, path, exc)
                continue
            length, why = _output_length(self.output_path(name))
            if length is None and record.status is JobStatus.INITIALIZING and why == "missing":
                length = 0  # the worker died before the job had any output file
            elif length is None and why == "missing":
                log.warning("job %s: output log %s is missing", name, self.output_path(name))
            elif length is None:
                log.warning("job %s: output log %s refused: %s", name, self.output_path(name), why)
            if not record.status.is_terminal:
                record = replace(
                    record,
                    status=JobStatus.LOST,
                    reason=LOST_REASON,
                    output_bytes=length or 0,
                    written_bytes=max(record.written_bytes, length or 0),
                )
                log.warning("job %s: marked LOST (%s)", record.id, LOST_REASON)
                found_lost.append(record.id)
                try:
                    self.keep(record)
                except OSError as exc:
                    log.warning(
                        "job %s: cannot save its LOST record (%s); it is written again once "
                        "possible",
                        record.id,
                        exc.strerror or exc,
                    )
            if length is None:
                record = replace(record, reason=f"{record.reason}; {OUTPUT_MISSING_REASON}")
            records.append(record)
            lengths[record.id] = length
        return LoadedJobs(records, lengths, 0, found_lost)
