"""The servicer: the only place that converts between protobuf messages and engine objects.

Each RPC is a plain method; errors are raised as jobworker.errors and mapped to status
codes by the connection handler (jobworker.server.errors). Role checks are not done
here: the handler applies the role table before any of these runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from jobworker.api import worker_pb2 as pb
from jobworker.engine import JobManager, JobRecord, JobSpec, Usage, rfc3339
from jobworker.errors import JobNotFound, OffsetOutOfRange, ServerShuttingDown
from jobworker.server.context import CallContext
from jobworker.server.listing import PageRequest, page, too_many
from jobworker.wire.contract import (
    DEFAULT_MAX_MESSAGE_BYTES,
    EXIT_CODE_TRAILER,
    OFFSET_HEADER,
    STATUS_TRAILER,
)

STREAM_CHUNK_BYTES = 64 * 1024  # DataChunk payload limit promised by the API
EXIT_CODE_UNKNOWN = -1  # no process exits with it: exit statuses are 0-255 (README "Jobs")

SendMessage = Callable[[Message], Awaitable[None]]
# Every call gets its CallContext (who, role, deadline, peer) from the dispatcher.
UnaryCall = Callable[[Any, CallContext], Awaitable[Message]]
StreamCall = Callable[[Any, SendMessage, CallContext], Awaitable[None]]
# A bidirectional call: receive() returns the next request, None once the client is done.
ReceiveMessage = Callable[[], Awaitable[Message | None]]
BidiCall = Callable[[ReceiveMessage, SendMessage, CallContext], Awaitable[None]]


@dataclass(frozen=True)
class Method:
    """One RPC: its request type and one of a unary call, a server-streaming call, or a
    bidirectional call (a stream of requests, a stream of responses)."""

    request_type: type[Message]
    unary: UnaryCall | None = None
    stream: StreamCall | None = None
    bidi: BidiCall | None = None


def job_fields(record: JobRecord, usage: pb.JobUsage) -> dict[str, Any]:
    """The fields shared by Job, CreateJobRes and GetJobRes: the spec's ten, then ours."""
    return {
        "id": record.id,
        "command": record.command,
        "args": list(record.args),
        "maxCPU": record.limits.cpu_percent,
        "maxMemory": record.limits.memory_mb,
        "maxIOBPS": record.limits.io_bps,
        "status": str(record.status),
        "startTime": rfc3339(record.start_time),
        "endTime": rfc3339(record.end_time),
        "exitCode": wire_exit_code(record),
        "reason": record.reason,
        "owner": record.owner,
        "usage": usage,
        "timeoutSeconds": record.timeout_s,
        "env": dict(record.env),
        "workingDir": record.working_dir,
    }


def job_usage(usage: Usage, output_bytes: int) -> pb.JobUsage:
    """A JobUsage from what the engine measured (0 where it did not)."""
    return pb.JobUsage(
        cpuSeconds=usage.cpu_time_s or 0.0,
        peakMemoryBytes=usage.peak_memory_bytes or 0,
        outputBytes=output_bytes,
        ioReadBytes=usage.io_read_bytes or 0,
        ioWriteBytes=usage.io_write_bytes or 0,
    )


def stream_start(offset: int, length: int) -> int:
    """Where a GetJobsStream of ``offset`` starts in an output of ``length`` bytes: at
    ``offset``, or for a negative one that many bytes before the end (at most the whole)."""
    return max(length + offset, 0) if offset < 0 else offset


def wire_exit_code(record: JobRecord) -> int:
    """The exit code as sent: 0 while the job runs, -1 for an ended job whose exit status is
    unknown (LOST, or its process could not be reaped): never a made-up 0."""
    if record.exit_code is not None:
        return record.exit_code
    return EXIT_CODE_UNKNOWN if record.status.is_terminal else 0


class JobService:
    """job_worker.JobService over a JobManager."""

    def __init__(
        self, manager: JobManager, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self._manager = manager
        self._max_message_bytes = max_message_bytes
        # A page must also fit what a client accepts by default: gRPC's default receive limit.
        self._page_bytes = min(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)
        # job id -> encoded one-job Jobs message, for terminal (immutable) records only.
        # It grows with the manager's job table; DeleteJob takes a job's entry out.
        self._finished_entries: dict[str, bytes] = {}
        self._accepting = True

    def refuse_new_jobs(self) -> None:
        """From now on CreateJob answers UNAVAILABLE ``server shutting down`` (every other
        RPC goes on). The server calls it as its health turns NOT_SERVING: a client that has
        not seen the change yet cannot start a job that the shutdown would stop at once. A
        CreateJob already past this check runs on (the shutdown stops its job)."""
        self._accepting = False

    def methods(self) -> dict[str, Method]:
        """RPC name (as in the proto) -> Method. The handler dispatches through this."""
        return {
            "CreateJob": Method(pb.CreateJobReq, unary=self.create_job),
            "GetJob": Method(pb.GetJobReq, unary=self.get_job),
            "StopJob": Method(pb.StopJobReq, unary=self.stop_job),
            "GetJobs": Method(pb.EmptyRequest, unary=self.get_jobs),
            "GetJobsStream": Method(pb.GetJobsStreamReq, stream=self.stream_job),
            "ListJobs": Method(pb.ListJobsReq, unary=self.list_jobs),
            "DeleteJob": Method(pb.DeleteJobReq, unary=self.delete_job),
        }

    async def create_job(self, request: pb.CreateJobReq, context: CallContext) -> pb.CreateJobRes:
        if not self._accepting:
            raise ServerShuttingDown
        spec = JobSpec(
            command=request.command,
            args=tuple(request.args),
            max_cpu=request.maxCPU,
            max_memory=request.maxMemory,
            max_iobps=request.maxIOBPS,
            owner=context.identity.name,
            timeout_seconds=request.timeoutSeconds,
            env=dict(request.env),
            working_dir=request.workingDir,
            request_id=request.requestId,
            role=context.role,
        )
        # A requestId this caller sent recently returns that job, as it is now (the engine's).
        record = await self._manager.create(spec)
        return pb.CreateJobRes(**job_fields(record, self._usage(record)))

    async def get_job(self, request: pb.GetJobReq, context: CallContext) -> pb.GetJobRes:
        record = self._manager.get(request.id)
        return pb.GetJobRes(**job_fields(record, self._usage(record)))

    async def stop_job(self, request: pb.StopJobReq, context: CallContext) -> pb.StopJobRes:
        record = await self._manager.stop(request.id)
        return pb.StopJobRes(
            id=record.id,
            status=str(record.status),
            endTime=rfc3339(record.end_time),
            exitCode=wire_exit_code(record),
            reason=record.reason,
            usage=self._usage(record),
        )

    async def delete_job(self, request: pb.DeleteJobReq, context: CallContext) -> pb.DeleteJobRes:
        """Remove an ended job, its output and its files; its streams end first (see
        JobManager.delete). The id is never used again."""
        record = await self._manager.delete(request.id)
        return pb.DeleteJobRes(id=record.id)

    def job_deleted(self, record: JobRecord) -> None:
        """A job was deleted (by DeleteJob, or by retention: the server has the manager call
        this): its listing entry goes with it."""
        self._finished_entries.pop(record.id, None)

    def _usage(self, record: JobRecord, *, from_cgroup: bool = True) -> pb.JobUsage:
        """What the job used: its final usage once ended; while it runs, the output it
        has written so far and (``from_cgroup``) its CPU and memory read from its cgroup now.
        Listings leave the cgroup out: listing hundreds of running jobs would read a few
        files per job on the event loop, and GetJob of one job reads them."""
        if record.status.is_terminal:
            return job_usage(record.usage, record.written_bytes)
        live = self._manager.usage(record.id) if from_cgroup else None
        # What the job wrote (an output cap keeps less of it), as the snapshot says.
        return job_usage(live or record.usage, record.written_bytes)

    async def get_jobs(self, request: pb.EmptyRequest, context: CallContext) -> pb.Jobs:
        """Every job in one message, or RESOURCE_EXHAUSTED if they do not fit one."""
        # Concatenated encodings of one-job Jobs messages parse as one Jobs message (a
        # repeated field appends). A finished job's fields never change, so its encoding is
        # built once; a running job's is rebuilt each time.
        entries = [self._listing_entry(record) for record in self._manager.list()]
        if sum(map(len, entries)) > self._max_message_bytes:
            raise too_many(len(entries))
        jobs: pb.Jobs = pb.Jobs.FromString(b"".join(entries))
        return jobs

    async def list_jobs(self, request: pb.ListJobsReq, context: CallContext) -> pb.ListJobsRes:
        """One page of jobs, in id order (or newest first), within the message limit."""
        wanted = PageRequest.parse(
            request.pageSize,
            request.pageToken,
            request.status,
            request.owner,
            request.newestFirst,
        )
        jobs, token = page(self._manager.list(), wanted, self._listing_entry, self._page_bytes)
        response: pb.ListJobsRes = pb.ListJobsRes.FromString(jobs)
        response.nextPageToken = token
        return response

    def _listing_entry(self, record: JobRecord) -> bytes:
        entry = self._finished_entries.get(record.id)
        if entry is None:
            usage = self._usage(record, from_cgroup=False)
            entry = pb.Jobs(jobs=[pb.Job(**job_fields(record, usage))])
            entry = entry.SerializeToString()
            if record.status.is_terminal:
                self._finished_entries[record.id] = entry
        return entry

    async def stream_job(
        self, request: pb.GetJobsStreamReq, send: SendMessage, context: CallContext
    ) -> None:
        """Output from ``offset`` (history, then live output), in chunks of at most 64 KiB,
        until the job has ended and every byte was sent. ``send`` waits on HTTP/2 flow
        control: a slow reader holds at most one chunk here (the engine never waits for it).
        On cancellation the reader is released by the engine's context manager.

        A negative ``offset`` counts back from the output's length at the open (clamped at 0);
        one past the end waits for the job to write that far. With ``noFollow`` the stream
        ends once it has sent the bytes the job had written when it opened. The response
        headers say where the stream starts (OFFSET_HEADER); an OK end says the job's status
        then, in the trailers (STATUS_TRAILER, EXIT_CODE_TRAILER). A start past the end of
        an ended job's output ends it with OUT_OF_RANGE (OffsetOutOfRange), a log that is
        gone with DATA_LOSS (OutputLost), even when there is nothing to send."""
        job_id = request.id
        # The length read and the reader made with no checkpoint in between: a negative
        # offset counts from exactly the length the reader starts against.
        start = stream_start(request.offset, self._manager.output_size(job_id))
        follow = self._manager.follow(
            job_id, offset=start, max_chunk=STREAM_CHUNK_BYTES, snapshot=request.noFollow
        )
        context.add_header(OFFSET_HEADER, str(start))
        async with follow as reader:
            async for chunk in reader:
                await send(pb.DataChunk(payload=chunk))
        self._end_stream(job_id, request, start, context)

    def _end_stream(
        self, job_id: str, request: pb.GetJobsStreamReq, start: int, context: CallContext
    ) -> None:
        """The end of a stream whose reader ended: OUT_OF_RANGE if it started past the end of
        an output that is final (a followed reader ends only then), else the job's status in
        the trailers."""
        try:
            record = self._manager.get(job_id)
        except JobNotFound:
            return  # deleted as the stream ended: it ends cleanly, with no status to tell
        length = self._manager.output_size(job_id)
        if start > length and (record.status.is_terminal or not request.noFollow):
            raise OffsetOutOfRange(job_id, request.offset, length)
        context.add_trailer(STATUS_TRAILER, str(record.status))
        context.add_trailer(EXIT_CODE_TRAILER, str(wire_exit_code(record)))
