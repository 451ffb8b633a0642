"""JobClient: the JobService calls over one mutual-TLS connection, with deadlines.

Usage::

    async with open_client("localhost:50051", cert=..., key=..., ca=...) as client:
        job = await client.create("echo", ["hello"])
        async with client.stream(job.id) as output:
            async for chunk in output:
                ...

Every unary call has a deadline (``call_timeout``, also sent as grpc-timeout);
connection setup (TCP, TLS, the server's first SETTINGS) has ``connect_timeout``.
Streams have no deadline. Leaving a call early (cancellation, an exception,
Ctrl+C, a ``break``) resets its HTTP/2 stream; leaving the client closes the
socket.
"""

from __future__ import annotations

import builtins
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar

import trio
from google.protobuf.message import DecodeError

from jobworker.api import worker_pb2
from jobworker.client.address import ServerAddress, parse_server
from jobworker.client.connection import Call, Connection
from jobworker.client.tls import client_ssl_context, open_tls_stream
from jobworker.errors import ConnectError, DeadlineExceeded, RpcError, unwrap
from jobworker.wire.contract import (
    EXIT_CODE_TRAILER,
    OFFSET_HEADER,
    SERVICE_NAME,
    STATUS_TRAILER,
)

SERVICE = SERVICE_NAME
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_CALL_TIMEOUT_S = 10.0
# Leaving the client: time to send the queued RST_STREAMs, then TLS
# close_notify. Bounded so a dead peer cannot hold the caller.
CLOSE_FLUSH_S = 1.0
CLOSE_STREAM_S = 1.0


def new_request_id() -> str:
    """A fresh idempotency key for ``JobClient.create``: 32 random hex digits (a UUID4)."""
    return uuid.uuid4().hex


class _Message(Protocol):
    def SerializeToString(self) -> bytes: ...  # protobuf's name


_Response = TypeVar("_Response")
_Response_co = TypeVar("_Response_co", covariant=True)


class _Parser(Protocol[_Response_co]):
    def FromString(self, data: bytes) -> _Response_co: ...  # protobuf's name


@contextlib.asynccontextmanager
async def open_client(
    server: str,
    *,
    cert: str | Path,
    key: str | Path,
    ca: str | Path,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    call_timeout: float = DEFAULT_CALL_TIMEOUT_S,
) -> AsyncIterator[JobClient]:
    """A connected JobClient, for the duration of an ``async with`` block.

    ``server`` is "host:port", "[v6]:port" or "host" (port 50051). Entering connects and
    raises ConnectError within ``connect_timeout`` on any failure (unreachable, TLS,
    certificate refused, missing certificate file, no SETTINGS from the server).

    The block runs inside the nursery of the connection's reader and writer tasks. Leaving
    it, however that happens (normal exit, exception, cancellation, Ctrl+C), resets the
    calls still open and flushes every queued RST_STREAM (shielded, at most
    CLOSE_FLUSH_S), stops the tasks, then sends TLS close_notify and closes the socket
    (shielded, at most CLOSE_STREAM_S). The tasks never raise (they fail the connection
    instead), so what leaves the block is its own exception, bare, not in a group.
    """
    try:
        address = parse_server(server)
    except ValueError as exc:
        raise ConnectError(str(exc)) from None
    context = client_ssl_context(cert, key, ca)
    deadline = trio.current_time() + connect_timeout
    too_slow = f"cannot connect to {address}: no answer within {connect_timeout:g} s"
    try:
        with trio.fail_at(deadline):
            stream = await open_tls_stream(address, context, cert)
    except trio.TooSlowError:
        raise ConnectError(too_slow) from None
    try:
        async with trio.open_nursery() as nursery:
            connection = Connection(stream, address, cert)
            nursery.start_soon(connection.run_reader)
            nursery.start_soon(connection.run_writer)
            try:
                try:
                    with trio.fail_at(deadline):
                        await connection.wait_ready()
                except trio.TooSlowError:
                    raise ConnectError(too_slow) from None
                yield JobClient(connection, address, call_timeout)
            finally:
                connection.close_gracefully()
                with trio.move_on_after(CLOSE_FLUSH_S, shield=True):
                    await connection.writer_done.wait()
                connection.stop_writer()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = unwrap(group)
        if isinstance(leaf, BaseExceptionGroup):
            raise
        raise leaf from leaf.__cause__
    finally:
        with trio.move_on_after(CLOSE_STREAM_S, shield=True):
            await stream.aclose()
        await trio.aclose_forcefully(stream)  # no-op if closed


class JobClient:
    """The JobService calls. Obtain one from open_client(); not usable after it exits."""

    def __init__(self, connection: Connection, address: ServerAddress, call_timeout: float):
        self._connection = connection
        self.address = address
        self.call_timeout = call_timeout

    async def create(
        self,
        command: str,
        args: Sequence[str] = (),
        max_cpu: int = 0,
        max_memory: int = 0,
        max_iobps: int = 0,
        *,
        timeout_seconds: int = 0,
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        request_id: str = "",
    ) -> worker_pb2.CreateJobRes:
        """CreateJob. Zero limits (and a zero ``timeout_seconds``) mean the server's
        defaults; ``env`` is added to the job's environment; ``working_dir`` "" means the
        job's own scratch dir. ``request_id`` is an idempotency key (up to 128 printable
        ASCII characters; "" none): a create this client identity sent with the same key
        within 24 h returns that job instead of starting another, so the call can be retried
        after a timeout or a dropped connection (``new_request_id`` makes one)."""
        request = worker_pb2.CreateJobReq(
            command=command,
            args=list(args),
            maxCPU=max_cpu,
            maxMemory=max_memory,
            maxIOBPS=max_iobps,
            timeoutSeconds=timeout_seconds,
            env=dict(env or {}),
            workingDir=working_dir,
            requestId=request_id,
        )
        return await self._unary("CreateJob", request, worker_pb2.CreateJobRes)

    async def get(self, job_id: str) -> worker_pb2.GetJobRes:
        """GetJob."""
        return await self._unary("GetJob", worker_pb2.GetJobReq(id=job_id), worker_pb2.GetJobRes)

    async def list(self) -> builtins.list[worker_pb2.Job]:
        """GetJobs: every job the server knows, in the server's order (RESOURCE_EXHAUSTED if
        they do not fit one message: use ``list_all``)."""
        jobs = await self._unary("GetJobs", worker_pb2.EmptyRequest(), worker_pb2.Jobs)
        return builtins.list(jobs.jobs)

    async def list_page(
        self,
        page_token: str = "",
        *,
        page_size: int = 0,
        statuses: Sequence[str] = (),
        owner: str = "",
        newest_first: bool = False,
    ) -> worker_pb2.ListJobsRes:
        """ListJobs: one page; pass its ``nextPageToken`` to get the next ("" = last page).
        ``statuses`` and ``owner`` filter (empty: every job), ``newest_first`` orders."""
        request = worker_pb2.ListJobsReq(
            pageSize=page_size,
            pageToken=page_token,
            status=builtins.list(statuses),
            owner=owner,
            newestFirst=newest_first,
        )
        return await self._unary("ListJobs", request, worker_pb2.ListJobsRes)

    async def list_all(
        self,
        *,
        statuses: Sequence[str] = (),
        owner: str = "",
        limit: int | None = None,
        newest_first: bool = False,
    ) -> builtins.list[worker_pb2.Job]:
        """Every job (in ``statuses``, of ``owner``, when given), in id order (or newest
        first), at most ``limit`` of them, paged through ListJobs (each page one call, with
        its own deadline; no page is asked for past the limit). On a server without ListJobs
        (UNIMPLEMENTED): GetJobs, with the same filters applied here."""
        jobs: builtins.list[worker_pb2.Job] = []
        token = ""
        while limit is None or len(jobs) < limit:
            try:
                page = await self.list_page(
                    token,
                    page_size=0 if limit is None else limit - len(jobs),
                    statuses=statuses,
                    owner=owner,
                    newest_first=newest_first,
                )
            except RpcError as exc:
                if exc.code_name == "UNIMPLEMENTED" and not token:
                    return _filtered(await self.list(), statuses, owner, limit, newest_first)
                raise
            jobs.extend(page.jobs)
            token = page.nextPageToken
            if not token:
                break
        return jobs[:limit]

    async def stop(self, job_id: str) -> worker_pb2.StopJobRes:
        """StopJob."""
        return await self._unary("StopJob", worker_pb2.StopJobReq(id=job_id), worker_pb2.StopJobRes)

    async def delete(self, job_id: str) -> worker_pb2.DeleteJobRes:
        """DeleteJob: remove an ended job, its output and its files (the id is never used
        again). NOT_FOUND for an unknown id, FAILED_PRECONDITION for a job still running."""
        request = worker_pb2.DeleteJobReq(id=job_id)
        return await self._unary("DeleteJob", request, worker_pb2.DeleteJobRes)

    def stream(self, job_id: str, *, follow: bool = True, offset: int = 0) -> JobOutput:
        """GetJobsStream as an async context manager yielding an iterator of output bytes.

        No deadline. Leaving the block before the end resets the stream. ``follow=False``
        (noFollow) ends the stream once the output that existed when it opened was sent.
        ``offset``: the byte to start at; negative counts back from the end (README "Output").
        To resume a stream that broke, open another at the broken one's ``offset``.
        """
        return JobOutput(self._connection, job_id, follow=follow, offset=offset)

    async def _unary(
        self, method: str, request: _Message, response_type: _Parser[_Response]
    ) -> _Response:
        timeout = self.call_timeout
        try:
            with trio.fail_after(timeout):
                call = await self._connection.open_call(
                    f"/{SERVICE}/{method}", request.SerializeToString(), timeout
                )
                try:
                    return await _single_response(call, response_type)
                finally:
                    call.close()
        except trio.TooSlowError:
            raise DeadlineExceeded(timeout) from None


def _filtered(
    jobs: Sequence[worker_pb2.Job],
    statuses: Sequence[str],
    owner: str,
    limit: int | None,
    newest_first: bool,
) -> builtins.list[worker_pb2.Job]:
    """What ListJobs would have listed of ``jobs`` (GetJobs' answer, in id order)."""
    wanted = {status.upper() for status in statuses}
    kept = [
        job
        for job in (reversed(jobs) if newest_first else jobs)
        if (not wanted or job.status in wanted) and (not owner or job.owner == owner)
    ]
    return kept[:limit]


async def _single_response(call: Call, response_type: _Parser[_Response]) -> _Response:
    data = await call.receive_message()
    if data is None:
        raise RpcError("INTERNAL", "the server sent no response")
    if await call.receive_message() is not None:
        raise RpcError("INTERNAL", "the server sent more than one response")
    return _decode(response_type, data)


def _decode(message_type: _Parser[_Response], data: bytes) -> _Response:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise RpcError("INTERNAL", "the server sent a malformed response") from None


class JobOutput:
    """A running GetJobsStream: ``async with`` it, then ``async for chunk in it``.

    Each item is one DataChunk's payload (raw bytes, never empty). Iteration
    ends when the server ends the stream with OK (the job ended and every byte
    was sent); a non-OK status raises RpcError, a dropped connection
    ConnectionLost. Leaving the block early (break, exception, cancellation)
    sends RST_STREAM(CANCEL) so the server stops streaming.

    ``start_offset`` is where the stream started in the job's output, once the
    server said so (with its first chunk; None before, and from a server that
    does not: it started at byte 0, whatever was asked); ``offset`` the byte
    after the last one yielded, where a new stream resumes with no gap and no
    duplicate. Once iteration has ended, ``trailers`` holds the server's
    trailing metadata (``status`` and ``exit_code`` the job's, from it).
    """

    def __init__(
        self, connection: Connection, job_id: str, *, follow: bool = True, offset: int = 0
    ) -> None:
        self._connection = connection
        self.job_id = job_id
        self.follow = follow
        self.requested_offset = offset
        self._call: Call | None = None
        self.ended = False  # the server ended the stream with OK: every byte was delivered
        self.start_offset: int | None = None
        self._received = 0  # bytes yielded
        self.trailers: dict[str, str] = {}

    @property
    def offset(self) -> int:
        """The offset of the next byte: where a stream that resumes this one starts."""
        if self.start_offset is not None:
            return self.start_offset + self._received
        if self.requested_offset >= 0 and not self._received:
            return self.requested_offset  # nothing received yet: still where we asked
        return self._received  # a server without offsets starts at byte 0

    @property
    def status(self) -> str | None:
        """The job's status when the stream ended (``jobworker-status``), None if the
        server did not say (or the stream has not ended)."""
        return self.trailers.get(STATUS_TRAILER)

    @property
    def exit_code(self) -> int | None:
        """The job's exit code as sent when the stream ended (``jobworker-exit-code``: 0
        while it runs, -1 unknown), None if the server did not say."""
        text = self.trailers.get(EXIT_CODE_TRAILER)
        try:
            return None if text is None else int(text)
        except ValueError:
            return None

    async def __aenter__(self) -> Self:
        request = worker_pb2.GetJobsStreamReq(id=self.job_id, noFollow=not self.follow)
        if self.requested_offset:  # unset, the request is byte for byte the spec's
            request.offset = self.requested_offset
        self._call = await self._connection.open_call(
            f"/{SERVICE}/GetJobsStream", request.SerializeToString(), None
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._call is not None:
            self._call.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        call = self._call
        if call is None:
            raise RuntimeError("use 'async with client.stream(id) as output' first")
        while True:
            data = await call.receive_message()
            if data is None:
                self.ended = True
                self.trailers = call.trailing_metadata
                if self.start_offset is None:  # a trailers-only end carries it there
                    self.start_offset = _offset(self.trailers)
                raise StopAsyncIteration
            if self.start_offset is None:
                self.start_offset = _offset(call.initial_metadata)
            payload: bytes = _decode(worker_pb2.DataChunk, data).payload
            if payload:
                self._received += len(payload)
                return payload


def _offset(metadata: dict[str, str]) -> int | None:
    text = metadata.get(OFFSET_HEADER)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
