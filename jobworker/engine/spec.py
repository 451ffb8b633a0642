"""Checking a job spec before anything starts: limits, command, arguments, environment,
time limit and working directory.

Everything here either returns what the job will run with or raises an
InvalidJobSpec subclass whose message is written for the client.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Mapping, Sequence

from jobworker.engine.model import (
    DEFAULT_CPU_PERCENT,
    DEFAULT_IO_BPS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PIDS_MAX,
    JobSpec,
    Limits,
)
from jobworker.errors import (
    CommandNotExecutable,
    CommandNotFound,
    CommandPathRefused,
    InvalidJobSpec,
    echo,
)

__all__ = [
    "EXEC_ARGS_BUDGET",
    "JOB_PATH",
    "MAX_ARGS_BYTES",
    "MAX_ARG_STRLEN",
    "MAX_COMMAND_BYTES",
    "MAX_ENV_BYTES",
    "MAX_TIMEOUT_SECONDS",
    "MIN_MEMORY_MB",
    "applied_timeout",
    "check_working_dir",
    "host_memory_mb",
    "job_environment",
    "job_search_path",
    "resolve_command",
    "validate_spec",
]

# Jobs get a fixed, conventional PATH: nothing of the server's environment leaks into them,
# and the same command resolves the same way whoever started the server.
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_LANG = "C.UTF-8"  # a UTF-8 locale that exists everywhere
# Below this not even a shell starts under a hard memory limit: refuse rather than OOM at once.
MIN_MEMORY_MB = 4
# Our own bound on what one request can make us hold and store: far beyond any sane job.
MAX_ARGS_BYTES = 1 << 20
# Linux's PATH_MAX: no longer command can be executed (and errors echo the command).
MAX_COMMAND_BYTES = 4096
# Our bound on the variables a client adds (names and values): room for any real
# configuration, far below what the kernel takes at exec, which is checked as well.
MAX_ENV_BYTES = 64 * 1024
# timeoutSeconds is an int32 on the wire.
MAX_TIMEOUT_SECONDS = 2**31 - 1

# What execve accepts, checked here so that a job the kernel would refuse never gets an id.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
POINTER_BYTES = struct.calcsize("P")
# The kernel refuses (E2BIG) any one argument longer than 32 pages, its NUL included.
MAX_ARG_STRLEN = 32 * PAGE_SIZE
# The room for argv and envp together (strings, NULs and pointers) is a quarter of the stack
# rlimit, which glibc reports as ARG_MAX; the kernel caps it at 3/4 of its 8 MiB stack default
# (glibc does not, for an unlimited stack).
KERNEL_ARG_MAX_CAP = 6 << 20
# What the launch takes from that room besides the job's arguments and the variables the client
# adds (counted with them): the base environment, the shim (its script names one cgroup.procs
# file per hierarchy) and the directory that PATH lookup puts in front of the command.
# Generous: a refusal here is clear, an E2BIG at exec is not.
LAUNCH_RESERVE_BYTES = 32 << 10
EXEC_ARGS_BUDGET = min(os.sysconf("SC_ARG_MAX"), KERNEL_ARG_MAX_CAP) - LAUNCH_RESERVE_BYTES
RELATIVE_REFUSED = (
    "relative command paths are not allowed: {command} (give an absolute path,"
    " or a bare name to look up in the job's PATH)"
)


def host_memory_mb() -> int:
    """The host's physical memory in MB (MemTotal): no job can use more, so none may ask."""
    return os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE // (1 << 20)


def validate_spec(spec: JobSpec, *, pids_max: int = DEFAULT_PIDS_MAX) -> Limits:
    """Check the spec's limits and strings; return the limits with defaults filled in."""
    cpu_count = os.cpu_count() or 1
    max_cpu_percent = 100 * cpu_count
    if spec.max_cpu < 0 or spec.max_cpu > max_cpu_percent:
        raise InvalidJobSpec(
            f"maxCPU must be between 0 and {max_cpu_percent} (percent of one core;"
            f" 0: the default, {DEFAULT_CPU_PERCENT}), got {spec.max_cpu}"
        )
    if spec.max_memory < 0:
        raise InvalidJobSpec(f"maxMemory must not be negative, got {spec.max_memory}")
    host_mb = host_memory_mb()
    if spec.max_memory > host_mb:
        raise InvalidJobSpec(
            f"maxMemory must be at most the host's memory ({host_mb} MB), got {spec.max_memory}"
        )
    if spec.max_iobps < 0:
        raise InvalidJobSpec(f"maxIOBPS must not be negative, got {spec.max_iobps}")
    memory_mb = spec.max_memory or DEFAULT_MEMORY_MB
    if memory_mb < MIN_MEMORY_MB:
        raise InvalidJobSpec(f"maxMemory must be at least {MIN_MEMORY_MB} MB, got {memory_mb}")
    if not spec.command:
        raise InvalidJobSpec("command must not be empty")
    if "\0" in spec.command:
        raise InvalidJobSpec("command must not contain NUL bytes")
    try:
        command_bytes = len(os.fsencode(spec.command))
    except UnicodeEncodeError:
        raise InvalidJobSpec("command must be valid text") from None
    if command_bytes > MAX_COMMAND_BYTES:
        raise InvalidJobSpec(
            f"command must be at most {MAX_COMMAND_BYTES} bytes, got {command_bytes}"
        )
    total = _check_args(spec.args)
    env_bytes = _check_env(spec.env)
    # argv as execve sees it: each string with its NUL, one pointer per string and the NULL;
    # envp likewise, each variable as NAME=VALUE.
    argc = 1 + len(spec.args)
    exec_bytes = command_bytes + total + argc + POINTER_BYTES * (argc + 1)
    if spec.env:
        exec_bytes += env_bytes + 2 * len(spec.env) + POINTER_BYTES * len(spec.env)
    if exec_bytes > EXEC_ARGS_BUDGET:
        what = "args and env exceed" if spec.env else "args exceed"
        strings = "arguments, environment" if spec.env else "arguments"
        raise InvalidJobSpec(
            f"{what} the kernel's limit for one exec (ARG_MAX): {exec_bytes} bytes of"
            f" {strings}, NULs and pointers, at most {EXEC_ARGS_BUDGET}"
        )
    return Limits(
        cpu_percent=spec.max_cpu or DEFAULT_CPU_PERCENT,
        memory_mb=memory_mb,
        io_bps=spec.max_iobps or DEFAULT_IO_BPS,
        pids_max=pids_max,
    )


def _check_args(args: Sequence[str]) -> int:
    """The arguments' total size in bytes, once each is known to be valid text without NUL
    and within MAX_ARG_STRLEN. Runs on the event loop: whole-sequence operations (join,
    one encode) so that a request of a million arguments costs milliseconds, with a
    per-argument pass only to name the one at fault."""
    # Each argument takes at least its NUL and its pointer: too many fail before any work.
    if len(args) * (POINTER_BYTES + 1) > EXEC_ARGS_BUDGET:
        raise InvalidJobSpec(
            f"args exceed the kernel's limit for one exec (ARG_MAX): {len(args)} arguments"
            f" take at least {POINTER_BYTES + 1} bytes each, at most {EXEC_ARGS_BUDGET} in all"
        )
    joined = "\0".join(args)
    separators = max(len(args) - 1, 0)
    if joined.count("\0") != separators:
        position = next(n for n, arg in enumerate(args, start=1) if "\0" in arg)
        raise InvalidJobSpec(f"args must not contain NUL bytes (argument {position})")
    try:
        total = len(os.fsencode(joined)) - separators
    except UnicodeEncodeError:
        position = next(n for n, arg in enumerate(args, start=1) if not _encodes(arg))
        raise InvalidJobSpec(f"args must be valid text (argument {position})") from None
    # A character is at most 4 bytes of UTF-8: only arguments that long need measuring.
    if max(map(len, args), default=0) * 4 + 1 > MAX_ARG_STRLEN:
        for position, arg in enumerate(args, start=1):
            size = len(os.fsencode(arg))
            if size + 1 > MAX_ARG_STRLEN:
                raise InvalidJobSpec(
                    f"argument {position} is longer than the kernel allows for one argument"
                    f" (MAX_ARG_STRLEN: {MAX_ARG_STRLEN - 1} bytes), got {size} bytes"
                )
    if total > MAX_ARGS_BYTES:
        raise InvalidJobSpec(f"args must total at most 1 MiB, got {total} bytes")
    return total


def _check_env(env: Mapping[str, str]) -> int:
    """The variables' total size in bytes (names and values), once each name is known to be
    a name execve can pass (not empty, no ``=``, no NUL) and each value to hold no NUL."""
    total = 0
    for name, value in env.items():
        if not name:
            raise InvalidJobSpec("env names must not be empty")
        if "\0" in name:
            raise InvalidJobSpec("env names must not contain NUL bytes")
        if "=" in name:
            raise InvalidJobSpec(f"env names must not contain '=': {echo(name)}")
        if "\0" in value:
            raise InvalidJobSpec(f"env value of {echo(name)} must not contain NUL bytes")
        if not (_encodes(name) and _encodes(value)):
            raise InvalidJobSpec(f"env variable {echo(name)} must be valid text")
        total += len(os.fsencode(name)) + len(os.fsencode(value))
    if total > MAX_ENV_BYTES:
        raise InvalidJobSpec(
            f"env must total at most {MAX_ENV_BYTES // 1024} KiB (names and values),"
            f" got {total} bytes"
        )
    return total


def applied_timeout(requested: int, *, default: int | None, maximum: int | None) -> int:
    """The time limit a job runs under, in seconds (0: none): ``requested``, or for 0 the
    server's ``default``, or (no default) its ``maximum``: a limit that a client could
    escape by leaving the field out would be none. Raises InvalidJobSpec for a negative
    request or one above ``maximum``."""
    if requested < 0:
        raise InvalidJobSpec(f"timeoutSeconds must not be negative, got {requested}")
    if maximum is not None and requested > maximum:
        raise InvalidJobSpec(
            f"timeoutSeconds must be at most {maximum} (the server's --max-job-timeout),"
            f" got {requested}"
        )
    if requested:
        return requested
    return default or maximum or 0


def job_search_path(env: Mapping[str, str]) -> str:
    """The PATH a job's command is looked up in: the client's, if it set one."""
    return env.get("PATH", JOB_PATH)


def check_working_dir(path: str, hidden: Sequence[str]) -> str:
    """Refuse a requested working directory that is not an absolute path to an existing
    directory, or that lies in one of the ``hidden`` directories (the server's data and
    certs dirs, which no job may see); return it as given. Whether the job's user may enter
    it is the caller's check (it knows the user). Blocking (stat): run in a thread.

    Raises InvalidJobSpec: ``working directory must be an absolute path: P``, ``... not
    found: P``, ``... is not a directory: P``, ``... is hidden from jobs: P``."""
    if "\0" in path:
        raise InvalidJobSpec("working directory must not contain NUL bytes")
    if not path.startswith("/"):
        raise InvalidJobSpec(f"working directory must be an absolute path: {echo(path)}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InvalidJobSpec(f"working directory not found: {echo(path)}") from None
    except NotADirectoryError:
        raise InvalidJobSpec(f"working directory is not a directory: {echo(path)}") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InvalidJobSpec(f"working directory unusable: {echo(path)} ({why})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidJobSpec(f"working directory is not a directory: {echo(path)}")
    real = os.path.realpath(path)
    for directory in hidden:
        root = os.path.realpath(directory)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            raise InvalidJobSpec(f"working directory is hidden from jobs: {echo(path)}")
    return path


def _encodes(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


NOT_FOUND = "not found"


def _why_not_executable(path: str) -> str | None:
    """None if ``path`` can be executed, NOT_FOUND if nothing is there, else why not.

    Raises CommandPathRefused when the kernel cannot resolve the path at all (a symbolic
    link loop, a name too long): execvp stops its search there too.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return NOT_FOUND
        if exc.errno == errno.EACCES:
            return "permission denied"
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CommandPathRefused(f"{why[:1].lower()}{why[1:]}: {echo(path)}", path) from None
    if stat.S_ISDIR(info.st_mode):
        return "is a directory"
    if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
        return "permission denied"
    return None


def resolve_command(command: str, search_path: str = JOB_PATH) -> str:
    """The absolute path to execute for ``command``, resolved like execvp would with the
    job's PATH (not the server's). A command containing a slash is never searched: it must
    be absolute, since a job runs in a fresh work dir of its own where a relative path could
    name nothing the client knows; for the same reason relative PATH entries (an empty one
    included) are skipped. Blocking (stat calls): run in a thread.

    Raises CommandNotFound, CommandNotExecutable when the only matches cannot be run, or
    CommandPathRefused (a relative path, a symbolic link loop).
    """
    if "/" in command:
        if not command.startswith("/"):
            raise CommandPathRefused(RELATIVE_REFUSED.format(command=echo(command)), command)
        why = _why_not_executable(command)
        if why == NOT_FOUND:
            raise CommandNotFound(command)
        if why is not None:
            raise CommandNotExecutable(command, why)
        return command  # as given: the kernel resolves "..", symbolic links and all
    refused: tuple[str, str] | None = None
    for directory in search_path.split(":"):
        if not directory.startswith("/"):
            continue  # relative (or empty: "."): the server's cwd is nothing of the job's
        candidate = os.path.join(directory, command)
        why = _why_not_executable(candidate)
        if why is None:
            return os.path.abspath(candidate)
        if why != NOT_FOUND and refused is None:
            refused = (candidate, why)  # execvp: remember EACCES, keep searching
    if refused is not None:
        raise CommandNotExecutable(*refused)
    raise CommandNotFound(command)


def job_environment() -> dict[str, str]:
    """The environment every job gets: PATH and LANG (HOME, its work dir, is added per job)."""
    return {"PATH": JOB_PATH, "LANG": JOB_LANG}
