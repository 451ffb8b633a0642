"""Checking a job spec before anything starts: limits, command, arguments, environment.

Everything here either returns what the job will run with or raises an
InvalidJobSpec subclass whose message is written for the client.
"""

from __future__ import annotations

import os
import pwd
import stat

from jobworker.engine.model import (
    DEFAULT_CPU_PERCENT,
    DEFAULT_IO_BPS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PIDS_MAX,
    JobSpec,
    Limits,
)
from jobworker.errors import CommandNotExecutable, CommandNotFound, InvalidJobSpec

__all__ = [
    "JOB_PATH",
    "MAX_ARGS_BYTES",
    "MAX_COMMAND_BYTES",
    "MIN_MEMORY_MB",
    "job_environment",
    "resolve_command",
    "validate_spec",
]

# Jobs get a fixed, conventional PATH: nothing of the server's environment leaks into them,
# and the same command resolves the same way whoever started the server.
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_LANG = "C.UTF-8"  # a UTF-8 locale that exists everywhere
# Below this not even a shell starts under a hard memory limit: refuse rather than OOM at once.
MIN_MEMORY_MB = 4
# Linux allows ~2 MiB of argv+environment per exec; 1 MiB of arguments leaves room and is
# far beyond any sane job, while bounding what one request can make us hold and store.
MAX_ARGS_BYTES = 1 << 20
# Linux's PATH_MAX: no longer command can be executed (and errors echo the command).
MAX_COMMAND_BYTES = 4096


def validate_spec(spec: JobSpec, *, pids_max: int = DEFAULT_PIDS_MAX) -> Limits:
    """Check the spec's limits and strings; return the limits with defaults filled in."""
    cpu_count = os.cpu_count() or 1
    max_cpu_percent = 100 * cpu_count
    if spec.max_cpu < 0 or spec.max_cpu > max_cpu_percent:
        raise InvalidJobSpec(
            f"maxCPU must be between 1 and {max_cpu_percent} (percent of one core), "
            f"got {spec.max_cpu}"
        )
    if spec.max_memory < 0:
        raise InvalidJobSpec(f"maxMemory must not be negative, got {spec.max_memory}")
    if spec.max_iobps < 0:
        raise InvalidJobSpec(f"maxIOBPS must not be negative, got {spec.max_iobps}")
    memory_mb = spec.max_memory or DEFAULT_MEMORY_MB
    if memory_mb < MIN_MEMORY_MB:
        raise InvalidJobSpec(f"maxMemory must be at least {MIN_MEMORY_MB} MB, got {memory_mb}")
    if not spec.command:
        raise InvalidJobSpec("command must not be empty")
    if "\0" in spec.command:
        raise InvalidJobSpec("command must not contain NUL bytes")
    total = 0
    for position, arg in enumerate(spec.args, start=1):
        if "\0" in arg:
            raise InvalidJobSpec(f"args must not contain NUL bytes (argument {position})")
        try:
            total += len(os.fsencode(arg))
        except UnicodeEncodeError:
            raise InvalidJobSpec(f"args must be valid text (argument {position})") from None
    if total > MAX_ARGS_BYTES:
        raise InvalidJobSpec(f"args must total at most 1 MiB, got {total} bytes")
    try:
        command_bytes = len(os.fsencode(spec.command))
    except UnicodeEncodeError:
        raise InvalidJobSpec("command must be valid text") from None
    if command_bytes > MAX_COMMAND_BYTES:
        raise InvalidJobSpec(
            f"command must be at most {MAX_COMMAND_BYTES} bytes, got {command_bytes}"
        )
    return Limits(
        cpu_percent=spec.max_cpu or DEFAULT_CPU_PERCENT,
        memory_mb=memory_mb,
        io_bps=spec.max_iobps or DEFAULT_IO_BPS,
        pids_max=pids_max,
    )


def _check_executable(path: str) -> str | None:
    """None if ``path`` can be executed, else why not (for the client message)."""
    try:
        info = os.stat(path)
    except OSError:
        return "not found"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory"
    if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
        return "permission denied"
    return None


def resolve_command(command: str, search_path: str = JOB_PATH) -> str:
    """The absolute path to execute for ``command``, resolved like execvp would with the
    job's PATH (not the server's). A command containing a slash is used as given
    (relative to the server's working directory). Blocking (stat calls): run in a thread.

    Raises CommandNotFound, or CommandNotExecutable when the only matches cannot be run.
    """
    if "/" in command:
        path = os.path.abspath(command)
        why = _check_executable(path)
        if why == "not found":
            raise CommandNotFound(command)
        if why is not None:
            raise CommandNotExecutable(command, why)
        return path
    refused: tuple[str, str] | None = None
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", command)
        why = _check_executable(candidate)
        if why is None:
            return os.path.abspath(candidate)
        if why != "not found" and refused is None:
            refused = (candidate, why)  # execvp: remember EACCES, keep searching
    if refused is not None:
        raise CommandNotExecutable(*refused)
    raise CommandNotFound(command)


def job_environment() -> dict[str, str]:
    """The whole environment a job gets: PATH, HOME (the server user's) and LANG."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = "/"
    return {"PATH": JOB_PATH, "HOME": home, "LANG": JOB_LANG}
