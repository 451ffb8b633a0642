"""One client connection: every RPC on it is authorized, bounded in time, mapped to a status
and audited here.

This replaces purerpc's ConnectionHandler (both of its methods would be overridden, so it
is not subclassed); it drives our ServerSocket (transport.py). Per RPC, in this order:
(service, method) lookup (UNIMPLEMENTED), the role table (PERMISSION_DENIED, before anything
else runs), the client's request rate (RESOURCE_EXHAUSTED, job service calls only), request
parsing (RESOURCE_EXHAUSTED / INVALID_ARGUMENT), the servicer call, the
status. Each RPC runs in its own cancel scope, cancelled by the client's RST_STREAM, by
its grpc-timeout (DEADLINE_EXCEEDED) or by the server closing the connection (UNAVAILABLE).
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import h2.exceptions
import trio
from google.protobuf.message import DecodeError, Message
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import Event, MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.status import Status, StatusCode

from jobworker import logtext
from jobworker.errors import RateLimited, RpcError, unwrap
from jobworker.server.auth import authorize, operation_name, rule_for
from jobworker.server.config import ConnectionLimits
from jobworker.server.context import CallContext
from jobworker.server.errors import status_for
from jobworker.server.identity import Identity
from jobworker.server.ratelimit import RateLimiter, retry_after_ms
from jobworker.server.service import Method
from jobworker.server.tls import Peer
from jobworker.server.transport import BadRequestMessage, ServerSocket, ServerStream
from jobworker.wire.contract import SERVICE_NAME

log = logging.getLogger(__name__)
audit_log = logging.getLogger("jobworker.audit")

STATUS_SEND_TIMEOUT_S = 1.0  # shielded: queueing trailers never waits on the peer, this is slack
FINAL_FLUSH_TIMEOUT_S = 2.0  # after the last RPC: time for the trailers/GOAWAY to reach the peer
DRAIN_TIMEOUT_S = 2.0  # graceful close: cancelled RPCs get this long to send their status
CLOSE_TIMEOUT_S = 1.0  # shielded socket close
SHUTDOWN_MESSAGE = "server shutting down"  # UNAVAILABLE status of RPCs cut by a shutdown
# What a vanished or misbehaving peer raises from the socket: logged as one line, not a bug.
TRANSPORT_ERRORS = (
    OSError,
    ssl.SSLError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


# (service, method) as in the gRPC path -> what serves it.
MethodTable = dict[tuple[str, str], Method]
# Told of every RPC's end: (service, method, code, seconds). Unknown methods come as "?".
RpcObserver = Callable[[str, str, StatusCode, float], None]


@dataclass
class CallRecord:
    """What the audit line says about one RPC."""

    method: str
    service: str = ""
    known: bool = False  # (service, method) is in the method table
    job_id: str = ""
    peer: str = ""  # the client's address
    code: StatusCode = StatusCode.CANCELLED  # until proven otherwise (connection lost)


class ConnectionHandler:
    """Serves the RPCs of one connection. One instance serves every connection."""

    def __init__(
        self,
        methods: MethodTable,
        limits: ConnectionLimits,
        observe_rpc: RpcObserver | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._methods = methods
        self._limits = limits
        self._observe_rpc = observe_rpc
        # Job service calls per client CN; health and reflection are never limited (a probe
        # that a busy client's burst turned away would take the server out of rotation).
        self._rate_limiter = rate_limiter
        self._config = GRPCConfiguration(
            client_side=False, max_message_length=limits.max_message_bytes
        )

    async def __call__(self, peer: Peer, closing: trio.Event, remote: str) -> None:
        """Serve ``peer`` until it disconnects, breaks the protocol, stays idle too long, or
        ``closing`` is set (server shutdown: RPCs end with UNAVAILABLE, then GOAWAY).

        On cancellation every RPC task is cancelled and the socket is closed; nothing of the
        connection survives this call.
        """
        sock = ServerSocket(
            self._config,
            peer.stream,
            limits=self._limits.wire,
            keepalive=self._limits.keepalive,
        )
        why = "closed"
        try:
            with trio.CancelScope() as connection_scope:
                async with sock.running():
                    try:
                        async with trio.open_nursery() as nursery:

                            def spawn(stream: ServerStream) -> None:
                                nursery.start_soon(
                                    self._serve_rpc, sock, stream, peer.identity, remote
                                )

                            nursery.start_soon(
                                self._close_gracefully_when_due, sock, closing, nursery, peer
                            )
                            nursery.start_soon(self._keep_alive, sock, nursery, peer)
                            why = await sock.run(spawn)
                            nursery.cancel_scope.cancel()  # the peer is gone: cancel its RPCs
                    finally:
                        # Leaving ``sock`` flushes what is queued (trailers, GOAWAY): bounded,
                        # for a peer that stopped reading.
                        connection_scope.deadline = trio.current_time() + FINAL_FLUSH_TIMEOUT_S
            if connection_scope.cancelled_caught:
                why = f"{why}; final flush timed out"
        except Exception as exc:  # the connection edge: a broken socket, a failed write
            leaf = unwrap(exc)
            if isinstance(leaf, TRANSPORT_ERRORS):
                why = f"connection lost ({leaf.__class__.__name__})"
            else:
                log.exception("unexpected error on the connection from %s", remote)
                why = "internal error"
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await anyio.aclose_forcefully(peer.stream)
            if sock.close_reason:
                why = sock.close_reason
            level = logging.INFO if sock.protocol_error else logging.DEBUG
            name = logtext.field(peer.identity.name)
            log.log(level, "connection from %s (%s) ended: %s", remote, name, why)

    async def _close_gracefully_when_due(
        self, sock: ServerSocket, closing: trio.Event, nursery: trio.Nursery, peer: Peer
    ) -> None:
        """Close the connection when the server shuts down or no RPC ran for idle_timeout:
        GOAWAY (no new RPC), cancel running RPCs (they answer UNAVAILABLE), wait for them
        (bounded), then end the connection."""
        idle = self._limits.idle_timeout
        while True:
            now = trio.current_time()
            if closing.is_set():
                sock.close_reason = SHUTDOWN_MESSAGE
                break
            due = sock.last_activity + idle
            if not sock.streams and now >= due:
                sock.close_reason = f"idle for {idle:g}s"
                log.info("closing idle connection (%s)", logtext.field(peer.identity.name))
                break
            with trio.move_on_at(due if now < due else now + idle):
                await closing.wait()
        await sock.send_goaway()
        for stream in list(sock.streams.values()):
            stream.cancel(closing=True)
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await sock.wait_no_streams()
        nursery.cancel_scope.cancel()

    async def _keep_alive(self, sock: ServerSocket, nursery: trio.Nursery, peer: Peer) -> None:
        """PING the peer after keepalive-time with nothing received; a PING unanswered for
        keepalive-timeout ends the connection (the peer is gone, or too stuck to matter)."""
        keepalive = sock.keepalive
        while True:
            due = keepalive.next_ping_at()
            if trio.current_time() < due:
                await trio.sleep_until(due)  # activity meanwhile moves the next PING: look again
                continue
            answered = sock.send_keepalive_ping()
            with trio.move_on_after(keepalive.policy.timeout):
                await answered.wait()
            if keepalive.waiting_for_ack:
                sock.close_reason = (
                    f"no answer to a keepalive PING within {keepalive.policy.timeout:g}s"
                )
                log.info(
                    "closing connection (%s): %s",
                    logtext.field(peer.identity.name),
                    sock.close_reason,
                )
                nursery.cancel_scope.cancel()
                return

    async def _serve_rpc(
        self, sock: ServerSocket, stream: ServerStream, identity: Identity, remote: str = ""
    ) -> None:
        """Run one RPC to its end, whatever the client does; always forget the stream and
        write the audit line. Cancelled with the connection (the audit says CANCELLED)."""
        started = trio.current_time()
        call = CallRecord(method="?", peer=remote)
        try:
            first = await stream.next_event()  # RequestReceived: queued before this task started
            assert isinstance(first, RequestReceived)
            call.method = first.method_name
            call.service = first.service_name
            status: Status | None = None
            timeout = first.timeout.total_seconds() if first.timeout is not None else math.inf
            # One scope for the client's deadline, its reset and our closing: what cancelled
            # it is told apart afterwards (a reset or a close says so on the stream).
            with trio.CancelScope(deadline=started + max(timeout, 0.0)) as rpc_scope:
                stream.cancel_scope = rpc_scope
                if stream.reset_by_peer or stream.closing:  # happened before we got here
                    rpc_scope.cancel()
                context = CallContext(
                    identity=identity,
                    service=first.service_name,
                    method=first.method_name,
                    deadline=rpc_scope.deadline,
                    peer=remote,
                )
                status = await self._call(stream, first, context, call)
            if rpc_scope.cancelled_caught:
                if stream.reset_by_peer:
                    status = Status(StatusCode.CANCELLED, "cancelled by the client")
                elif stream.closing:
                    status = Status(StatusCode.UNAVAILABLE, _closing_message(sock))
                else:
                    status = Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            assert status is not None
            call.code = status.status_code
            if not stream.reset_by_peer and not stream.locally_closed:
                with (
                    trio.move_on_after(STATUS_SEND_TIMEOUT_S, shield=True),
                    contextlib.suppress(h2.exceptions.H2Error),  # reset meanwhile: nobody to tell
                ):
                    await stream.close(status, _custom_trailers(stream, status, context))
        finally:
            sock.forget(stream)
            elapsed = trio.current_time() - started
            _audit(identity, call, elapsed)
            if self._observe_rpc is not None:
                service, method = (call.service, call.method) if call.known else ("?", "?")
                self._observe_rpc(service, method, call.code, elapsed)

    async def _call(
        self, stream: ServerStream, request: RequestReceived, context: CallContext, call: CallRecord
    ) -> Status:
        """Authorize, parse, run the servicer with the call's context, send the response;
        return the final status.

        Every Exception is turned into a status here (the RPC edge); Cancelled propagates.
        """
        try:
            method = self._lookup(request)
            call.known = True
            authorize(context.identity, request.service_name, request.method_name)
            self._limit_rate(context)
            receive = self._receiver(stream, method.request_type)

            async def send(response: Message) -> None:
                if not stream.response_started:
                    await stream.start_response(context.headers)
                await stream.send_message(response)

            if method.bidi is not None:
                await method.bidi(receive, send, context)
                return Status(StatusCode.OK)
            message = await _one_request(receive)
            call.job_id = str(getattr(message, "id", ""))
            if method.unary is not None:
                response = await method.unary(message, context)
                call.job_id = call.job_id or str(getattr(response, "id", ""))
                await send(response)
            elif method.stream is not None:
                await method.stream(message, send, context)
            return Status(StatusCode.OK)
        except Exception as exc:
            leaf = unwrap(exc)
            if isinstance(leaf, RpcError):
                for name, value in leaf.trailers:
                    context.add_error_trailer(name, value)
            return status_for(exc)

    def _limit_rate(self, context: CallContext) -> None:
        """Take a token of the caller's bucket for a job service call; raise RateLimited
        (with the retry hint) if there is none."""
        if self._rate_limiter is None or context.service != SERVICE_NAME:
            return
        wait = self._rate_limiter.take(context.identity.name)
        if wait:
            raise RateLimited(retry_after_ms(wait))

    def _lookup(self, request: RequestReceived) -> Method:
        method = self._methods.get((request.service_name, request.method_name))
        if method is None:
            raise RpcError(
                StatusCode.UNIMPLEMENTED,
                f"unknown method {request.service_name}/{request.method_name}",
            )
        return method

    def _receiver(
        self, stream: ServerStream, request_type: type[Message]
    ) -> Callable[[], Awaitable[Message | None]]:
        """``receive()``: the next request message of ``stream``, None once the client has
        ended its requests.

        Each wait is bounded by the idle timeout: a client that opens a stream and never
        finishes its request would otherwise hold the handler, and its connection, forever."""
        ended = False
        idle = self._limits.idle_timeout

        async def next_event() -> Event:
            if stream.has_event():  # a unary request arrives whole: no wait, no scope
                return await stream.next_event()
            with trio.move_on_after(idle):
                return await stream.next_event()
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"request not received within {idle:g}s")

        async def receive() -> Message | None:
            nonlocal ended
            if ended:
                return None
            data: bytes | None = None
            while data is None:
                event = await next_event()
                if isinstance(event, BadRequestMessage):
                    raise RpcError(event.code, event.message)
                if isinstance(event, MessageReceived):
                    data = event.data
                elif isinstance(event, RequestEnded):
                    ended = True
                    return None
            try:
                return request_type.FromString(data)
            except DecodeError:
                raise RpcError(StatusCode.INVALID_ARGUMENT, "malformed request message") from None

        return receive


async def _one_request(receive: Callable[[], Awaitable[Message | None]]) -> Message:
    """The single request message of a unary-request RPC (exactly one, then the end)."""
    message = await receive()
    if message is None or await receive() is not None:
        raise RpcError(StatusCode.INVALID_ARGUMENT, "expected one request message")
    return message


def _custom_trailers(
    stream: ServerStream, status: Status, context: CallContext
) -> list[tuple[str, str]]:
    """The handler's custom metadata for the end of its call: its trailers on an OK end
    (with its headers too in a trailers-only response, which carries both); on an error
    only its error trailers (those of the error itself, such as a retry hint): the others
    could describe a state the call never reached."""
    if status.status_code != StatusCode.OK:
        return context.error_trailers
    if stream.response_started:
        return context.trailers
    return [*context.headers, *context.trailers]


def _closing_message(sock: ServerSocket) -> str:
    """Why an RPC the server cancelled ends: the shutdown, or another close."""
    if sock.close_reason == SHUTDOWN_MESSAGE:
        return SHUTDOWN_MESSAGE
    return "server is closing the connection"


# Audit fields come from clients (a job id, a method name) or certificates (CN, OU): one line
# per RPC must stay one line, and short.
_field = logtext.field


def _audit(identity: Identity, call: CallRecord, elapsed: float) -> None:
    """One line per RPC; the same facts as structured fields for the JSON log format."""
    rule = rule_for(call.service, call.method)
    if call.code == StatusCode.PERMISSION_DENIED:
        level = logging.WARNING
    elif rule is not None and rule.quiet:
        level = logging.DEBUG
    else:
        level = logging.INFO
    fields = {
        "event": "rpc",
        "identity": identity.name,
        "role": identity.role_label,
        "method": call.method,
        "op": operation_name(call.service, call.method),
        "job": call.job_id or None,
        "outcome": call.code.name,
        "duration_ms": round(elapsed * 1000, 1),
        "peer": call.peer or None,
    }
    audit_log.log(
        level,
        "rpc identity=%s role=%s method=%s op=%s job=%s outcome=%s duration_ms=%.1f peer=%s",
        _field(identity.name),
        _field(identity.role_label),
        _field(call.method),
        _field(operation_name(call.service, call.method)),
        _field(call.job_id) if call.job_id else "-",
        call.code.name,
        elapsed * 1000,
        call.peer or "-",
        extra=fields,
    )
