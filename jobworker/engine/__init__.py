"""The job engine: a plain Trio library that runs, stops, records and streams jobs.

No gRPC, TLS or protobuf here; the server converts at its edge.
"""

from __future__ import annotations

from jobworker.engine.manager import JobManager, open_job_manager
from jobworker.engine.model import (
    JobRecord,
    JobSpec,
    JobStatus,
    Limits,
    Usage,
    rfc3339,
    utc_now,
)
from jobworker.engine.output import OutputReader
from jobworker.engine.quotas import RoleCeiling, RunningLimits
from jobworker.engine.store import LOST_REASON
from jobworker.engine.supervision import (
    SHUTDOWN_REASON,
    STOP_GRACE_S,
    STOPPED_REASON,
    TIMED_OUT_PREFIX,
    timed_out_reason,
)

__all__ = [
    "LOST_REASON",
    "SHUTDOWN_REASON",
    "STOPPED_REASON",
    "STOP_GRACE_S",
    "TIMED_OUT_PREFIX",
    "JobManager",
    "JobRecord",
    "JobSpec",
    "JobStatus",
    "Limits",
    "OutputReader",
    "RoleCeiling",
    "RunningLimits",
    "Usage",
    "open_job_manager",
    "rfc3339",
    "timed_out_reason",
    "utc_now",
]
