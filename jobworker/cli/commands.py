"""Running one parsed command against the server: the six commands and their output."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import BinaryIO, TextIO

import trio

from jobworker.api import worker_pb2
from jobworker.cli import render
from jobworker.cli.args import EXIT_OK, EXIT_SERVER_ERROR, Command, Connection
from jobworker.client import (
    ConnectError,
    ConnectionLost,
    JobClient,
    RpcError,
    ServerShuttingDown,
    new_request_id,
    open_client,
)

# A create that got no answer may or may not have started its job: it is sent once more,
# on a new connection, with the same request id, and the server answers with the job the
# first one started, if it did. The pause lets a server that is restarting come back.
CREATE_RETRY_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
CREATE_RETRY_PAUSE_S = 0.25


async def run(command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """Connect, run the command, write its output; return the exit status.

    Raises RpcError for the caller to report. Cancellation or Ctrl+C
    resets a stream in progress and closes the connection on the way out.
    """
    json = command.output == "json"
    if command.name == "create":
        created = await create(command, stderr)
        text = render.as_json(created) if json else render.created(created)
        stdout.write(text.encode())
        stdout.flush()
        return EXIT_OK
    if command.name == "stream":
        return await stream_resuming(command, stdout, stderr)
    async with _connect(command.connection) as client:
        if command.name == "get":
            job = await client.get(command.job_id)
            text = render.as_json(job) if json else render.job_details(job)
        elif command.name == "list":
            jobs = await client.list_all(
                statuses=command.statuses,
                owner=command.owner,
                limit=command.limit,
                newest_first=command.newest_first,
            )
            text = render.as_json(jobs) if json else render.job_list(jobs)
        elif command.name == "stop":
            result = await client.stop(command.job_id)
            text = render.as_json(result) if json else render.stopped(result)
        elif command.name == "delete":
            removed = await client.delete(command.job_id)
            text = render.as_json(removed) if json else render.deleted(removed)
        else:  # the parser only produces the six names
            raise AssertionError(f"unknown command {command.name}")
    stdout.write(text.encode())
    stdout.flush()
    return EXIT_OK


def _connect(settings: Connection) -> AbstractAsyncContextManager[JobClient]:
    return open_client(
        settings.server,
        cert=settings.cert,
        key=settings.key,
        ca=settings.ca,
        connect_timeout=settings.timeout,
        call_timeout=settings.timeout,
    )


def retries_create(error: RpcError) -> bool:
    """True if a create that failed with ``error`` is sent again: the ones that leave the
    job's fate unknown, a connection that dropped mid-call or no answer in time. Not a
    connection that could not be made (the request was never sent: a certificate problem
    or an unreachable server, reported as it is), nor a server that said it is shutting
    down (it refused the job)."""
    if isinstance(error, ConnectError | ServerShuttingDown):
        return False
    return error.code_name in CREATE_RETRY_CODES


async def create(command: Command, stderr: TextIO) -> worker_pb2.CreateJobRes:
    """CreateJob with the command's request id (a fresh one if it gives none), on a
    connection of its own; after an error that ``retries_create``, once more on a new
    connection, with a notice on stderr. Raises the RpcError that ends it."""
    request_id = command.request_id or new_request_id()
    try:
        return await _create_once(command, request_id)
    except RpcError as exc:
        if not retries_create(exc):
            raise
        stderr.write(
            f"jobworker: {render.escape(str(exc))}; sending the create again"
            f" (request id {render.escape(request_id)})\n"
        )
        stderr.flush()
    await trio.sleep(CREATE_RETRY_PAUSE_S)
    return await _create_once(command, request_id)


async def _create_once(command: Command, request_id: str) -> worker_pb2.CreateJobRes:
    async with _connect(command.connection) as client:
        return await client.create(
            command.command,
            command.args,
            max_cpu=command.max_cpu,
            max_memory=command.max_memory,
            max_iobps=command.max_iobps,
            timeout_seconds=command.timeout_seconds,
            env=dict(command.env),
            working_dir=command.working_dir,
            request_id=request_id,
        )


class OutputWriter:
    """Writes the job's output to stdout as it comes, flushed per chunk: the raw bytes, or
    (``-o json``) one JSON object per chunk and line, with its offset and base64 payload."""

    def __init__(self, stdout: BinaryIO, *, json_lines: bool) -> None:
        self._stdout = stdout
        self._json_lines = json_lines

    def write(self, offset: int, chunk: bytes) -> None:
        """Write ``chunk``, which starts at byte ``offset`` of the job's output."""
        data = render.chunk_json(offset, chunk).encode() if self._json_lines else chunk
        # A blocking write on purpose: stdout is the user's terminal or pipe, and a
        # slow reader should slow the stream down (flow control does the rest).
        self._stdout.write(data)
        self._stdout.flush()


# A stream whose connection drops reconnects and resumes at the byte it reached (no gap, no
# duplicate: the server starts exactly there), this many times, waiting longer each time.
STREAM_RETRY_PAUSES_S = (0.5, 1.0, 2.0)


async def stream_resuming(command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """``stream``, again from where it was on a new connection when the connection drops
    (ConnectionLost, or no connection to be had for a retry), with a notice on stderr, up to
    len(STREAM_RETRY_PAUSES_S) times; ``--no-retry`` fails at once. A graceful shutdown of
    the server (ServerShuttingDown) is not retried: it is reported, as before."""
    progress = StreamProgress()
    pauses = list(STREAM_RETRY_PAUSES_S) if command.retry else []
    lost: ConnectionLost | None = None
    while True:
        try:
            async with _connect(command.connection) as client:
                return await stream(client, command, stdout, stderr, progress)
        except ServerShuttingDown:
            raise
        except (ConnectionLost, ConnectError) as exc:
            if not progress.opened:
                raise  # the stream never opened: nothing to resume
            if isinstance(exc, ConnectionLost):
                lost = exc
            if not pauses:
                # Out of retries: what went wrong is the lost connection, whether or not the
                # last reconnection was refused.
                raise (lost or exc) from None
            pause = pauses.pop(0)
            at = f" at byte {progress.offset if progress.offset is not None else progress.start}"
            stderr.write(f"Connection lost{at}: reconnecting in {pause:g} s\n")
            stderr.flush()
            await trio.sleep(pause)


class StreamProgress:
    """Where a stream is, across reconnections: where it started (None until the first
    checks are done), the byte after the last one written (None before any), and whether a
    stream was ever opened."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.offset: int | None = None
        self.opened = False
        self.readable = True


async def stream(
    client: JobClient,
    command: Command,
    stdout: BinaryIO,
    stderr: TextIO,
    progress: StreamProgress | None = None,
) -> int:
    """Copy the job's output to stdout (see OutputWriter), flushed per chunk.

    GetJob first (so an unknown id is one error line, without a banner), then the stream
    from --offset, or from the start of the last --tail lines (with --follow=false:
    noFollow, the output that exists now). At its end, the job's status from the stream's
    trailers (GetJob again from a server that does not send them): exit 1 with the status on
    stderr if it did not complete.
    """
    job_id = command.job_id
    progress = progress or StreamProgress()
    writer = OutputWriter(stdout, json_lines=command.output == "json")
    if progress.start is None:  # the first connection: checks, start, banner
        progress.readable = await _may_get(client, job_id)
        start = command.offset
        if command.tail is not None:
            start = await tail_start(client, job_id, command.tail)
        if command.follow and progress.readable:
            stderr.write(
                f"Streaming logs for job {render.escape(job_id)} (Press Ctrl+C to exit):\n"
            )
            stderr.flush()
        progress.start = start
    offset = progress.offset if progress.offset is not None else progress.start
    readable = progress.readable
    async with client.stream(job_id, follow=command.follow, offset=offset) as output:
        progress.opened = True
        async for chunk in output:
            writer.write(output.offset - len(chunk), chunk)
            progress.offset = output.offset
    status, exit_code = output.status, output.exit_code
    if status is None or exit_code is None:
        if not readable:
            return EXIT_OK
        after = await client.get(job_id)
        status, exit_code = after.status, after.exitCode
    if status == "COMPLETED":
        return EXIT_OK
    if status in render.ENDED_STATUSES:
        stderr.write(
            f"Job {render.escape(job_id)} ended with status {render.escape(status)}"
            f" (exit code {exit_code})\n"
        )
    elif not command.follow:
        return EXIT_OK  # still running: we printed the output so far
    else:
        stderr.write(
            f"Job {render.escape(job_id)} has not ended: the stream stopped with status"
            f" {render.escape(status)}\n"
        )
    stderr.flush()
    return EXIT_SERVER_ERROR


# --tail reads the end of the output in windows until one holds the lines asked for: the
# first fits the tail of most jobs in one read, each miss reads 4 times more, and the last
# bounds the memory a tail of a job without newlines takes (it then starts that far back).
TAIL_FIRST_WINDOW_BYTES = 64 * 1024
TAIL_WINDOW_GROWTH = 4
TAIL_MAX_WINDOW_BYTES = 64 * 1024 * 1024


async def tail_start(client: JobClient, job_id: str, lines: int) -> int:
    """The offset of the first of the last ``lines`` lines of the job's output now (a last
    line without its newline counts; 0 lines: the end). Reads windows of the output's end
    with noFollow streams, so the offset is exact, however the job writes on meanwhile."""
    window = TAIL_FIRST_WINDOW_BYTES
    while True:
        async with client.stream(job_id, follow=False, offset=-window) as output:
            data = b"".join([chunk async for chunk in output])
        start = output.start_offset or 0  # a server without offsets sent it all, from 0
        found = last_lines_start(data, lines)
        if found is not None:
            return start + found
        if start == 0 or window >= TAIL_MAX_WINDOW_BYTES:
            return start
        window *= TAIL_WINDOW_GROWTH


def last_lines_start(data: bytes, lines: int) -> int | None:
    """Where the last ``lines`` lines of ``data`` begin, None if it holds fewer whole ones
    (its first line may be cut)."""
    if lines == 0:
        return len(data)
    at = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        at = data.rfind(b"\n", 0, at)
        if at < 0:
            return None
    return at + 1


async def _may_get(client: JobClient, job_id: str) -> bool:
    """GetJob, for its errors: False if the role may not call it. The stream then reports
    what it is denied itself (operation stream_job, not get_job)."""
    try:
        await client.get(job_id)
    except RpcError as exc:
        if exc.code_name != "PERMISSION_DENIED":
            raise
        return False
    return True
