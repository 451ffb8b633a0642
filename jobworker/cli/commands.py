"""Running one parsed command against the server: the five commands and their output."""

from __future__ import annotations

from typing import BinaryIO, TextIO

from jobworker.cli import render
from jobworker.cli.args import EXIT_OK, EXIT_SERVER_ERROR, Command
from jobworker.client import JobClient, RpcError, open_client


async def run(command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """Connect, run the command, write its output; return the exit status.

    Raises RpcError for the caller to report. Cancellation or Ctrl+C
    resets a stream in progress and closes the connection on the way out.
    """
    settings = command.connection
    async with open_client(
        settings.server,
        cert=settings.cert,
        key=settings.key,
        ca=settings.ca,
        connect_timeout=settings.timeout,
        call_timeout=settings.timeout,
    ) as client:
        if command.name == "stream":
            return await stream(client, command, stdout, stderr)
        json = command.output == "json"
        if command.name == "create":
            created = await client.create(
                command.command,
                command.args,
                max_cpu=command.max_cpu,
                max_memory=command.max_memory,
                max_iobps=command.max_iobps,
            )
            text = render.as_json(created) if json else render.created(created)
        elif command.name == "get":
            job = await client.get(command.job_id)
            text = render.as_json(job) if json else render.job_details(job)
        elif command.name == "list":
            jobs = await client.list_all()
            text = render.as_json(jobs) if json else render.job_list(jobs)
        elif command.name == "stop":
            result = await client.stop(command.job_id)
            text = render.as_json(result) if json else render.stopped(result)
        else:  # the parser only produces the five names
            raise AssertionError(f"unknown command {command.name}")
    stdout.write(text.encode())
    stdout.flush()
    return EXIT_OK


class OutputWriter:
    """Writes the job's output to stdout as it comes, flushed per chunk: the raw bytes, or
    (``-o json``) one JSON object per chunk and line, with its offset and base64 payload."""

    def __init__(self, stdout: BinaryIO, *, json_lines: bool) -> None:
        self._stdout = stdout
        self._json_lines = json_lines
        self.offset = 0  # the stream starts at the job's first byte

    def write(self, chunk: bytes) -> None:
        data = render.chunk_json(self.offset, chunk).encode() if self._json_lines else chunk
        self.offset += len(chunk)
        # A blocking write on purpose: stdout is the user's terminal or pipe, and a
        # slow reader should slow the stream down (flow control does the rest).
        self._stdout.write(data)
        self._stdout.flush()


async def stream(client: JobClient, command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """Copy the job's output to stdout (see OutputWriter), flushed per chunk.

    GetJob first (so an unknown id is one error line, without a banner), then the stream
    (with --follow=false: noFollow, the output that exists now); at its end, GetJob again to
    report how the job ended: exit 1 with the status on stderr if it did not complete.
    """
    job_id = command.job_id
    writer = OutputWriter(stdout, json_lines=command.output == "json")
    readable = await _may_get(client, job_id)
    if command.follow and readable:
        stderr.write(f"Streaming logs for job {render.escape(job_id)} (Press Ctrl+C to exit):\n")
        stderr.flush()
    async with client.stream(job_id, follow=command.follow) as output:
        async for chunk in output:
            writer.write(chunk)
    if not readable:
        return EXIT_OK
    after = await client.get(job_id)
    if after.status == "COMPLETED":
        return EXIT_OK
    if after.status in render.ENDED_STATUSES:
        stderr.write(
            f"Job {render.escape(job_id)} ended with status {render.escape(after.status)}"
            f" (exit code {after.exitCode})\n"
        )
    elif not command.follow:
        return EXIT_OK  # still running: we printed the output so far
    else:
        stderr.write(
            f"Job {render.escape(job_id)} has not ended: the stream stopped with status"
            f" {render.escape(after.status)}\n"
        )
    stderr.flush()
    return EXIT_SERVER_ERROR


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
