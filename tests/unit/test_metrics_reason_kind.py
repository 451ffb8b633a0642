"""jobworker_jobs_ended_total's ``reason_kind``, from the reasons the engine really writes
(engine/supervision.py ``_finalize`` and ``_fail_start``, engine/store.py at load)."""

from __future__ import annotations

import errno
import os
from dataclasses import replace

import pytest

from jobworker.engine import (
    LOST_REASON,
    SHUTDOWN_REASON,
    STOPPED_REASON,
    timed_out_reason,
    utc_now,
)
from jobworker.engine.model import JobRecord, JobStatus, Limits, Usage
from jobworker.engine.output import DISK_FULL_CAUSE
from jobworker.engine.store import OUTPUT_MISSING_REASON
from jobworker.engine.supervision import LAUNCHER_DIED_REASON
from jobworker.launch.launcher import SPAWN_REPLY_S
from jobworker.server.metrics import REASON_KINDS, reason_kind

FAILED, STOPPED = JobStatus.FAILED, JobStatus.STOPPED
# What the output pump appends after "; " when output was lost: the cause is "data disk
# full" or the strerror, lower-cased (engine/output.py).
LOSS = f"5 bytes of output lost: {DISK_FULL_CAUSE}"
TIMED_OUT_LOSS = f"5 bytes of output lost: {os.strerror(errno.ETIMEDOUT).lower()}"
SPAWN_GIVEN_UP = f"the launcher did not start the job in {SPAWN_REPLY_S:.0f} s"  # launcher.py

CASES = [
    (JobStatus.COMPLETED, "exited with status 0", "exited"),
    (FAILED, "exited with status 3", "exited"),
    (FAILED, "killed by signal 9", "exited"),
    (FAILED, "exit status unknown", "exited"),
    (FAILED, LAUNCHER_DIED_REASON, "exited"),
    (FAILED, "internal error: cleanup did not finish", "exited"),
    # A cause that mentions a timeout is no job timeout: the job exited.
    (JobStatus.COMPLETED, f"exited with status 0; {TIMED_OUT_LOSS}", "exited"),
    (STOPPED, STOPPED_REASON, "stopped"),
    (STOPPED, f"{STOPPED_REASON}; {LOSS}", "stopped"),
    (STOPPED, SHUTDOWN_REASON, "shutdown"),
    (STOPPED, f"{SHUTDOWN_REASON}; {LOSS}", "shutdown"),
    (FAILED, "out of memory (limit 50 MB)", "oom"),
    (FAILED, f"out of memory (limit 50 MB); {LOSS}", "oom"),
    (JobStatus.LOST, LOST_REASON, "lost"),
    (JobStatus.LOST, f"{LOST_REASON}; {OUTPUT_MISSING_REASON}", "lost"),
    (FAILED, f"could not start: {os.strerror(errno.ENOENT)}", "start_failed"),
    (FAILED, f"could not start: {SPAWN_GIVEN_UP}", "start_failed"),
    (FAILED, timed_out_reason(30), "timeout"),
    (FAILED, f"{timed_out_reason(1)}; {LOSS}", "timeout"),
]


def record(status: JobStatus, reason: str) -> JobRecord:
    return JobRecord(
        id="7",
        command="/bin/true",
        args=(),
        limits=Limits(),
        status=status,
        start_time=utc_now(),
        end_time=utc_now(),
        reason=reason,
    )


@pytest.mark.parametrize(("status", "reason", "kind"), CASES)
def test_each_engine_reason_has_its_kind(status: JobStatus, reason: str, kind: str) -> None:
    assert reason_kind(record(status, reason)) == kind


def test_an_oom_kill_counted_by_the_kernel_is_oom_whatever_the_reason() -> None:
    # v1 kills only the largest process: the job may exit 0 all the same.
    exited = replace(record(FAILED, "exited with status 0"), usage=Usage(oom_kills=1))
    assert reason_kind(exited) == "oom"
    # ...but a stop asked for stays a stop.
    stopped = replace(record(STOPPED, STOPPED_REASON), usage=Usage(oom_kills=1))
    assert reason_kind(stopped) == "stopped"


def test_every_kind_comes_from_an_engine_reason() -> None:
    assert {kind for _, _, kind in CASES} == set(REASON_KINDS)


def test_a_job_that_exits_saying_timed_out_is_no_timeout() -> None:
    # Only the engine's own stop at the time limit is a timeout: that job is FAILED.
    assert reason_kind(record(JobStatus.COMPLETED, timed_out_reason(5))) == "exited"
