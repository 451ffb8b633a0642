"""Running one parsed command against the server: the five commands and their output."""

from __future__ import annotations

from typing import BinaryIO, TextIO

import trio

from jobworker.cli import render
from jobworker.cli.args import EXIT_OK, EXIT_SERVER_ERROR, Command
from jobworker.client import JobClient, JobOutput, open_client

# --follow=false on a running job: the API has no "output so far" call, so we
# read what the server sends (history comes first, at once) until it has been
# quiet this long, then cancel the stream. A job that never pauses is cut off
# after --timeout seconds.
NO_FOLLOW_FIRST_CHUNK_S = 0.5  # the first chunk may wait for the server to open the log
NO_FOLLOW_QUIET_S = 0.2


async def run(command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """Connect, run the command, write its output; return the exit status.

    Raises ClientError for the caller to report. Cancellation or Ctrl+C
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


async def stream(client: JobClient, command: Command, stdout: BinaryIO, stderr: TextIO) -> int:
    """Copy the job's output to stdout as raw bytes, flushed per chunk.

    GetJob first (so an unknown id is one error line, without a banner), then
    the stream; at its end, GetJob again to report how the job ended: exit 1
    with the status on stderr if it did not complete.
    """
    job_id = command.job_id
    before = await client.get(job_id)
    if command.follow:
        stderr.write(f"Streaming logs for job {job_id} (Press Ctrl+C to exit):\n")
        stderr.flush()
    async with client.stream(job_id) as output:
        if command.follow or before.status in render.ENDED_STATUSES:
            async for chunk in output:
                _write(stdout, chunk)
        else:
            with trio.move_on_after(command.connection.timeout):  # a job that never pauses
                await _copy_until_quiet(output, stdout)
            if not output.ended:
                return EXIT_OK  # still running: we printed the output so far
    after = await client.get(job_id)
    if after.status == "COMPLETED":
        return EXIT_OK
    if after.status in render.ENDED_STATUSES:
        stderr.write(
            f"Job {job_id} ended with status {after.status} (exit code {after.exitCode})\n"
        )
    else:
        stderr.write(f"Job {job_id} has not ended: the stream stopped with status {after.status}\n")
    stderr.flush()
    return EXIT_SERVER_ERROR


async def _copy_until_quiet(output: JobOutput, stdout: BinaryIO) -> None:
    """Copy chunks until the stream ends or none came for NO_FOLLOW_QUIET_S."""
    wait = NO_FOLLOW_FIRST_CHUNK_S
    while True:
        with trio.move_on_after(wait) as quiet:
            try:
                chunk = await output.__anext__()
            except StopAsyncIteration:
                return
        if quiet.cancelled_caught:
            return
        _write(stdout, chunk)
        wait = NO_FOLLOW_QUIET_S


def _write(stdout: BinaryIO, chunk: bytes) -> None:
    # A blocking write on purpose: stdout is the user's terminal or pipe, and a
    # slow reader should slow the stream down (flow control does the rest).
    stdout.write(chunk)
    stdout.flush()
