"""The one table from errors to gRPC status codes, and the translation at the RPC edge.

Only JobWorkerError messages (written for people) and our own fixed messages reach a
client. Anything else becomes INTERNAL ``internal error`` and its traceback goes to the
server log, never to the client.
"""

from __future__ import annotations

import logging

from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import Status, StatusCode

from jobworker.errors import (
    DataDiskFull,
    InvalidJobSpec,
    JobIsRunning,
    JobNotFound,
    JobNotRunning,
    JobStartFailed,
    JobWorkerError,
    OffsetOutOfRange,
    OutputLost,
    PermissionDenied,
    RpcError,
    TooManyRunningJobs,
    unwrap,
)

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"  # all a client learns about an unexpected failure

# Error class -> status code. Looked up along the exception's MRO, so subclasses
# (CommandNotFound, LimitRefused, ...) inherit their parent's code.
STATUS_TABLE: dict[type[JobWorkerError], StatusCode] = {
    JobNotFound: StatusCode.NOT_FOUND,
    JobNotRunning: StatusCode.FAILED_PRECONDITION,
    JobIsRunning: StatusCode.FAILED_PRECONDITION,
    InvalidJobSpec: StatusCode.INVALID_ARGUMENT,
    PermissionDenied: StatusCode.PERMISSION_DENIED,
    JobStartFailed: StatusCode.INTERNAL,  # its message is written to be safe to show
    DataDiskFull: StatusCode.RESOURCE_EXHAUSTED,
    TooManyRunningJobs: StatusCode.RESOURCE_EXHAUSTED,
    OutputLost: StatusCode.DATA_LOSS,
    OffsetOutOfRange: StatusCode.OUT_OF_RANGE,
}


def status_for(exc: Exception) -> Status:
    """The status a client sees for ``exc``. Logs the traceback of anything unexpected."""
    leaf = unwrap(exc)
    if isinstance(leaf, RpcError):
        return Status(StatusCode[leaf.code_name], leaf.message)
    if isinstance(leaf, JobWorkerError):
        for cls in type(leaf).__mro__:
            code = STATUS_TABLE.get(cls)
            if code is not None:
                return Status(code, str(leaf))
    if isinstance(leaf, RpcFailedError):
        # purerpc's own errors carry a status; their messages are fixed strings of ours
        # or purerpc's (never a repr), so they can pass through.
        status: Status = leaf.status
        return status
    log.error("unexpected error in an RPC", exc_info=exc)
    return Status(StatusCode.INTERNAL, INTERNAL_MESSAGE)
