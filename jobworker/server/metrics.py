"""Prometheus metrics of one server: a registry of its own (never the process-global one, so
servers run side by side in one process do not mix), filled two ways.

- Events counted as they happen, at the edges of the engine and the server: RPCs (the
  connection handler's observer), job starts, stream readers and their bytes and catch-ups
  (``ObservedManager``, the job manager as the servicer sees it).
- State read at scrape time (``_StateCollector``): jobs by status, jobs created and ended,
  output bytes, per-running-job CPU and memory from the cgroups, open connections and
  failed handshakes. Nothing is kept twice; counters derived from state stay monotonic
  because output logs only grow and what a deleted job counted for is kept as a tally
  (``_StateCollector.forget``, told of every deletion).

Counters count since this server started, as Prometheus expects (``rate()`` handles the
reset at a restart). Jobs loaded from the data dir are not "created" or "ended" by this
server, except those it found LOST, which count as ended with reason_kind ``lost``.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from purerpc.grpclib.status import StatusCode

from jobworker import __version__
from jobworker.engine import (
    SHUTDOWN_REASON,
    TIMED_OUT_PREFIX,
    JobManager,
    JobRecord,
    JobSpec,
    JobStatus,
    OutputReader,
)
from jobworker.server.listener import Listener

# Buckets: job starts take milliseconds (a spawn, a cgroup join); RPCs range from sub-ms
# unary calls to streams that follow a job for hours.
JOB_START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
# The values of jobworker_jobs_ended_total's reason_kind label ("timeout": stopped at its
# time limit, timeoutSeconds or the server's default).
REASON_KINDS = ("exited", "stopped", "oom", "timeout", "lost", "start_failed", "shutdown")
# The engine's reasons that name a kind by their start ("out of memory (limit 50 MB)",
# "could not start: ...", "timed out after 30 s"); the others are exits, judged by status.
OOM_PREFIX = "out of memory"
START_FAILED_PREFIX = "could not start"


def reason_kind(record: JobRecord) -> str:
    """Why a terminal job ended, as one of REASON_KINDS, from its status and the first
    clause of its reason: what the engine appends after "; " (``N bytes of output lost:
    connection timed out``, ``its output log is missing``) does not change why it ended."""
    reason = record.reason.split("; ", 1)[0]
    if record.status is JobStatus.LOST:
        return "lost"
    if record.status is JobStatus.STOPPED:
        return "shutdown" if reason == SHUTDOWN_REASON else "stopped"
    if record.status is JobStatus.FAILED and reason.startswith(TIMED_OUT_PREFIX):
        return "timeout"
    if reason.startswith(OOM_PREFIX) or record.usage.oom_kills:
        return "oom"
    if reason.startswith(START_FAILED_PREFIX):
        return "start_failed"
    return "exited"


def cgroups_label(controller: Any) -> str:
    """``v1``, ``v2`` or ``none``: which cgroup driver enforces the limits."""
    if not controller.enforced:
        return "none"
    return str(type(controller).__module__.rsplit(".", 1)[-1])


class ServerMetrics:
    """Every metric of one server, and its registry (what the /metrics endpoint renders)."""

    def __init__(self, *, cgroups: str, isolation: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._state: _StateCollector | None = None  # once watch_state was called
        r = self.registry
        self.rpcs = Counter(
            "jobworker_rpcs",
            "RPCs ended, by service, method and status code ('?' for unknown methods)",
            ["service", "method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "jobworker_rpc_duration_seconds",
            "RPC duration, from its request headers to its status",
            ["service", "method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.job_start = Histogram(
            "jobworker_job_start_seconds",
            "CreateJob received to the job's process placed in its cgroups (successful starts)",
            buckets=JOB_START_BUCKETS,
            registry=r,
        )
        self.streams_active = Gauge(
            "jobworker_streams_active", "Output streams (GetJobsStream readers) open", registry=r
        )
        self.stream_bytes = Counter(
            "jobworker_stream_bytes", "Output bytes handed to stream readers", registry=r
        )
        self.stream_catch_ups = Counter(
            "jobworker_stream_catch_ups",
            "Times a stream reader fell behind the live output and caught up from disk",
            registry=r,
        )
        Info("jobworker", "The server's version and what it enforces", registry=r).info(
            {"version": __version__, "cgroups": cgroups, "isolation": isolation}
        )

    def observe_rpc(self, service: str, method: str, code: StatusCode, seconds: float) -> None:
        """The connection handler's RpcObserver."""
        self.rpcs.labels(service, method, code.name).inc()
        self.rpc_duration.labels(service, method).observe(seconds)

    def watch_state(self, manager: JobManager, listener: Listener) -> None:
        """Report the manager's jobs and the listener's connections at every scrape (the
        jobs this start found LOST count as ended, once)."""
        lost = list(manager.found_lost)
        self._state = _StateCollector(manager, listener, lost)
        self.registry.register(self._state)

    def job_deleted(self, record: JobRecord) -> None:
        """A job was deleted: what it counted for (created, ended, output) stays counted."""
        if self._state is not None:
            self._state.forget(record)


class _StateCollector(Collector):
    """Metrics read from the engine and the listener at scrape time."""

    def __init__(self, manager: JobManager, listener: Listener, lost: list[str]) -> None:
        self._manager = manager
        self._listener = listener
        self._loaded_ids = {record.id for record in manager.list()}
        self._lost = lost
        # What the deleted jobs of this server counted for: created, ended, output bytes.
        self._deleted_created = 0
        self._deleted_ended: collections.Counter[tuple[str, str]] = collections.Counter()
        self._deleted_output = 0

    def forget(self, record: JobRecord) -> None:
        """``record``'s job was deleted (it had ended): keep its share of the counters."""
        if record.id in self._loaded_ids:
            self._loaded_ids.discard(record.id)  # never counted: nothing to keep
            return
        self._deleted_created += 1
        self._deleted_ended[(str(record.status), reason_kind(record))] += 1
        self._deleted_output += record.output_bytes

    def describe(self) -> list[Metric]:
        return []  # the families vary with the jobs: no fixed description

    def collect(self) -> Iterator[Metric]:
        records = self._manager.list()
        by_status = collections.Counter(str(record.status) for record in records)
        jobs = GaugeMetricFamily("jobworker_jobs", "Jobs known, by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([str(status)], by_status[str(status)])
        yield jobs

        ours = [record for record in records if record.id not in self._loaded_ids]
        yield CounterMetricFamily(
            "jobworker_jobs_created",
            "Jobs created by this server",
            value=len(ours) + self._deleted_created,
        )
        ended: collections.Counter[tuple[str, str]] = collections.Counter(
            (str(record.status), reason_kind(record))
            for record in ours
            if record.status.is_terminal
        )
        ended[(str(JobStatus.LOST), "lost")] += len(self._lost)
        ended.update(self._deleted_ended)
        family = CounterMetricFamily(
            "jobworker_jobs_ended",
            "Jobs that ended under this server (or that it found LOST), by status and why",
            labels=["status", "reason_kind"],
        )
        for (ended_status, kind), count in sorted(ended.items()):
            family.add_metric([ended_status, kind], count)
        yield family

        yield CounterMetricFamily(
            "jobworker_output_bytes",
            "Output bytes written by the jobs of this server",
            value=sum(self._manager.output_size(record.id) for record in ours)
            + self._deleted_output,
        )

        cpu = CounterMetricFamily(
            "jobworker_job_cpu_seconds",
            "CPU time of each running job, from its cgroup",
            labels=["job"],
        )
        memory = GaugeMetricFamily(
            "jobworker_job_memory_bytes",
            "Peak memory of each running job so far, from its cgroup",
            labels=["job"],
        )
        for record in records:
            if record.status is not JobStatus.RUNNING:
                continue
            usage = self._manager.usage(record.id)
            if usage is None:
                continue
            if usage.cpu_time_s is not None:
                cpu.add_metric([record.id], usage.cpu_time_s)
            if usage.peak_memory_bytes is not None:
                memory.add_metric([record.id], usage.peak_memory_bytes)
        yield cpu
        yield memory

        yield GaugeMetricFamily(
            "jobworker_connections_active",
            "Client connections open (handshaking ones included)",
            value=self._listener.connections,
        )
        failures = CounterMetricFamily(
            "jobworker_handshake_failures",
            "TLS handshakes that failed, by kind",
            labels=["reason"],
        )
        for kind, count in sorted(self._listener.handshake_failures.items()):
            failures.add_metric([kind], count)
        yield failures


class ObservedManager:
    """The job manager as the servicer sees it: every call goes to ``manager``; job starts
    and stream readers are counted on the way. Duck-typed: give it where a JobManager is
    expected (``as_manager``)."""

    def __init__(self, manager: JobManager, metrics: ServerMetrics) -> None:
        self._manager = manager
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def as_manager(self) -> JobManager:
        """This proxy, typed as what it stands for."""
        proxy: Any = self
        return proxy  # type: ignore[no-any-return]

    async def create(self, spec: JobSpec) -> JobRecord:
        started = trio.current_time()
        record = await self._manager.create(spec)
        self._metrics.job_start.observe(trio.current_time() - started)
        return record

    @asynccontextmanager
    async def _follow(self, *args: Any, **kwargs: Any) -> AsyncIterator[OutputReader]:
        async with self._manager.follow(*args, **kwargs) as reader:
            self._metrics.streams_active.inc()
            try:
                yield _CountingReader(reader, self._metrics)  # type: ignore[misc]
            finally:
                self._metrics.streams_active.dec()
                self._metrics.stream_catch_ups.inc(reader.catch_ups)

    def follow(self, *args: Any, **kwargs: Any) -> Any:
        """JobManager.follow, counted (open readers, bytes, catch-ups)."""
        return self._follow(*args, **kwargs)


class _CountingReader:
    """An OutputReader that counts the bytes it hands out."""

    def __init__(self, reader: OutputReader, metrics: ServerMetrics) -> None:
        self._reader = reader
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def __aiter__(self) -> _CountingReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._reader.__anext__()
        self._metrics.stream_bytes.inc(len(chunk))
        return chunk
