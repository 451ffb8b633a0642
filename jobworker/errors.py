"""The one error tree of jobworker, for the server and the client alike.

Every error a caller may see is a JobWorkerError whose message is written for
people, in the spec's wording where the spec has one::

    JobWorkerError
     +-- JobNotFound, JobNotRunning, JobIsRunning, InvalidJobSpec (CommandNotFound,
     |   AboveRoleLimit, ...), JobStartFailed, DataDiskFull, TooManyRunningJobs,
     |   OutputLost, OffsetOutOfRange, PermissionDenied
     +-- RpcError: a call ends (server side) or ended (client side) with a gRPC status
          +-- RateLimited           RESOURCE_EXHAUSTED, over the client's request rate
          +-- DeadlineExceeded      DEADLINE_EXCEEDED, no answer in time
          +-- ServerShuttingDown    UNAVAILABLE "server shutting down"
          +-- ConnectError          UNAVAILABLE, no usable connection could be made
          +-- ConnectionLost        UNAVAILABLE, the connection dropped mid-call

The server maps each of the first group to a gRPC status code in one table
(jobworker.server.errors) and sends an RpcError's status as it is; anything else
that escapes a handler is reported as INTERNAL with a short message. The client
raises only RpcErrors: the status the server sent, or the one a grpc client would
report for a failure of the connection itself.

Nurseries wrap what escapes them in exception groups; ``leaves`` and ``unwrap``
are the one way to look inside.
"""

from __future__ import annotations

import enum

# Errors echo what the client sent (an id, a command). Echo a bounded prefix: the message
# travels in an HTTP/2 trailer, where grpc clients drop anything over 16 KiB and the HPACK
# encoder's cost grows with the square of the length.
MAX_ECHO_CHARS = 200


def echo(text: str) -> str:
    """``text`` as it may appear in an error message: at most MAX_ECHO_CHARS characters."""
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


class JobWorkerError(Exception):
    """Base of every error jobworker reports to a caller. str(err) is the client message."""


class JobNotFound(JobWorkerError):
    """Raised for an id that names no job: ``job not found: <id>``."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job not found: {echo(job_id)}")
        self.job_id = job_id


class JobNotRunning(JobWorkerError):
    """Raised when stopping a job that has already ended (or never ran).

    Message: ``job is not running: <id> (current status: <STATUS>)``.
    """

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job is not running: {echo(job_id)} (current status: {status})")
        self.job_id = job_id
        self.status = status


class JobIsRunning(JobWorkerError):
    """Raised when deleting a job that has not ended (INITIALIZING, RUNNING, or processes of
    it survive): ``job is running: <id>``. Nothing is removed."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job is running: {echo(job_id)}")
        self.job_id = job_id


class InvalidJobSpec(JobWorkerError):
    """Raised before anything starts when a job spec is malformed or a limit cannot be applied."""


class CommandNotFound(InvalidJobSpec):
    """Raised when the command is not found: ``command not found in PATH: <command>`` for a
    bare name, ``no such file: <path>`` for a path (a path is never searched in PATH)."""

    def __init__(self, command: str) -> None:
        if "/" in command:
            super().__init__(f"no such file: {echo(command)}")
        else:
            super().__init__(f"command not found in PATH: {echo(command)}")
        self.command = command


class CommandPathRefused(InvalidJobSpec):
    """Raised when a command path cannot be used as given: a relative path, or a path the
    kernel cannot resolve (a symbolic link loop, a name too long). The message says which."""

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


class CommandNotExecutable(InvalidJobSpec):
    """Raised when the command exists but cannot be executed (a directory, no x bit)."""

    def __init__(self, command: str, why: str) -> None:
        super().__init__(f"command is not executable: {echo(command)} ({why})")
        self.command = command


class LimitRefused(InvalidJobSpec):
    """Raised when the kernel refuses a resource limit; the job is not started."""


class AboveRoleLimit(InvalidJobSpec):
    """Raised before anything starts when a job asks for more than the ceiling of its
    creator's role (``--role-limits``), compared after the defaults are filled in:
    ``maxMemory 16384 MB is above the limit for role viewer: 8192 MB`` (``(the default)``
    after the value when the request left the field at 0)."""

    def __init__(
        self, field: str, value: int, limit: int, unit: str, role: str, *, default: bool
    ) -> None:
        space = "" if unit == "%" else " "
        shown = f"{value}{space}{unit}" + (" (the default)" if default else "")
        super().__init__(
            f"{field} {shown} is above the limit for role {echo(role)}: {limit}{space}{unit}"
        )
        self.field = field
        self.value = value
        self.limit = limit
        self.role = role


class JobStartFailed(JobWorkerError):
    """Raised when the process could not be started for a reason outside the spec (server side)."""


class DataDiskFull(JobWorkerError):
    """Raised by CreateJob, before an id is used, while the data disk has less free space
    than the server's floor (``--min-free-disk``): ``data disk full``."""

    def __init__(self) -> None:
        super().__init__("data disk full")


class TooManyRunningJobs(JobWorkerError):
    """Raised by CreateJob, before an id is used, when the running jobs (INITIALIZING or
    RUNNING) already reach a limit: ``too many running jobs: N (limit N)`` for the server's
    (``--max-running-jobs``), ``too many running jobs for <CN>: N (limit N)`` for one
    client's (``--max-running-jobs-per-client``; ``owner`` is that client's CN)."""

    def __init__(self, running: int, limit: int, owner: str | None = None) -> None:
        whose = "" if owner is None else f" for {echo(owner)}"
        super().__init__(f"too many running jobs{whose}: {running} (limit {limit})")
        self.running = running
        self.limit = limit
        self.owner = owner


class OutputLost(JobWorkerError):
    """Raised by a stream when the job's output file is gone (or unusable) on the server:
    ``output of job <id> is missing``."""

    def __init__(self, job_id: str, what: str = "is missing") -> None:
        super().__init__(f"output of job {echo(job_id)} {what}")
        self.job_id = job_id


class OffsetOutOfRange(JobWorkerError):
    """Raised by a stream asked to start past the end of an ended job's output, where no
    byte will ever be: ``offset <N> is beyond the end of job <id>'s output (<L> bytes)``."""

    def __init__(self, job_id: str, offset: int, length: int) -> None:
        super().__init__(
            f"offset {offset} is beyond the end of job {echo(job_id)}'s output ({length} bytes)"
        )
        self.job_id = job_id
        self.offset = offset
        self.length = length


class PermissionDenied(JobWorkerError):
    """Raised when the caller's role does not allow the operation.

    Message: ``role <role> is not allowed to perform operation <op>``.
    """

    def __init__(self, role: str, operation: str) -> None:
        super().__init__(f"role {role} is not allowed to perform operation {operation}")
        self.role = role
        self.operation = operation


class RpcError(JobWorkerError):
    """A call ends, or ended, with a gRPC status other than OK.

    ``code_name`` is the status name (``NOT_FOUND``, ``UNAVAILABLE``, ...); ``message`` is
    the status message, e.g. ``job not found: 999``. Server code raises it to end a call
    with exactly that status; the client raises it for the status a server sent.
    """

    def __init__(self, code: str | enum.Enum, message: str) -> None:
        code_name = code if isinstance(code, str) else code.name
        super().__init__(message or code_name.lower().replace("_", " "))
        self.code_name = code_name
        self.message = message
        # Custom metadata (name, value) the server sends in the trailers of this error end.
        self.trailers: tuple[tuple[str, str], ...] = ()


# The trailer of a RateLimited end: whole milliseconds until the next call may pass.
RETRY_AFTER_TRAILER = "jobworker-retry-after-ms"


class RateLimited(RpcError):
    """The server refuses a call over its client's request rate (``--rate-limit``):
    RESOURCE_EXHAUSTED ``rate limit exceeded: retry after N ms``, and N again in the
    trailer RETRY_AFTER_TRAILER (``trailers``, sent with the error status)."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            "RESOURCE_EXHAUSTED", f"rate limit exceeded: retry after {retry_after_ms} ms"
        )
        self.retry_after_ms = retry_after_ms
        self.trailers = ((RETRY_AFTER_TRAILER, str(retry_after_ms)),)


class DeadlineExceeded(RpcError):
    """Raised by the client when a unary call gets no complete answer within its deadline.

    The call is cancelled (RST_STREAM) before this is raised; the server was told the same
    deadline in ``grpc-timeout``.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__("DEADLINE_EXCEEDED", f"deadline exceeded: no answer within {timeout:g} s")
        self.timeout = timeout


SHUTDOWN_MESSAGE = "server shutting down"  # the server's words, and the client's


class ServerShuttingDown(RpcError):
    """The server ends a call because it is going away: a status UNAVAILABLE ``server
    shutting down``, UNAVAILABLE after the server announced a graceful close (GOAWAY with
    NO_ERROR), or the connection ending after such a GOAWAY before the call finished. The
    call may be retried once the server is back.
    """

    def __init__(self) -> None:
        super().__init__("UNAVAILABLE", SHUTDOWN_MESSAGE)


class ConnectError(RpcError):
    """Raised by open_client when no usable connection could be set up (UNAVAILABLE).

    Messages say which step failed: ``cannot connect to host:port: ...``,
    ``certificate verify failed: ...`` (the server's certificate),
    ``the server refused our certificate: ...`` or ``TLS handshake refused by server:
    ...`` (ours), ``missing certificate file at PATH``,
    ``certificate file is a directory: PATH``, ``cannot load certificate PATH: not a PEM
    certificate``, ``cannot load key PATH: ...``, ``key PATH does not match certificate
    PATH``.
    """

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


class ConnectionLost(RpcError):
    """Raised by every call in progress (and every later call) once the connection has
    dropped (UNAVAILABLE)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "UNAVAILABLE", f"connection lost: {detail}" if detail else "connection lost"
        )
        self.detail = detail


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, however deeply grouped; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def unwrap(exc: BaseException) -> BaseException:
    """``exc`` without the single-member groups around it (a nursery wraps even one error)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
