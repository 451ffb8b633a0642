"""The one error tree of jobworker.

Every error a client may see is a JobWorkerError whose message is written for
people, in the spec's wording where the spec has one. The server maps each
class to a gRPC status code in one table (jobworker.server.errors); anything
else that escapes a handler is reported as INTERNAL with a short message.
"""

from __future__ import annotations

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


class JobStartFailed(JobWorkerError):
    """Raised when the process could not be started for a reason outside the spec (server side)."""


class DataDiskFull(JobWorkerError):
    """Raised by CreateJob, before an id is used, while the data disk has less free space
    than the server's floor (``--min-free-disk``): ``data disk full``."""

    def __init__(self) -> None:
        super().__init__("data disk full")


class OutputLost(JobWorkerError):
    """Raised by a stream when the job's output file is gone (or unusable) on the server:
    ``output of job <id> is missing``."""

    def __init__(self, job_id: str, what: str = "is missing") -> None:
        super().__init__(f"output of job {echo(job_id)} {what}")
        self.job_id = job_id


class PermissionDenied(JobWorkerError):
    """Raised when the caller's role does not allow the operation.

    Message: ``role <role> is not allowed to perform operation <op>``.
    """

    def __init__(self, role: str, operation: str) -> None:
        super().__init__(f"role {role} is not allowed to perform operation {operation}")
        self.role = role
        self.operation = operation
