"""The standard gRPC health service (``grpc.health.v1.Health``) on the server's own port.

Two names are known: ``""`` (the server as a whole) and ``job_worker.JobService``; both
share one status. NOT_SERVING until the server accepts jobs, SERVING from then on, and
NOT_SERVING again from the first moment of shutdown: ``shut_down()`` returns once every
Watch stream has been handed the change (bounded, for watchers that do not read), so they
learn it before their connection closes. As the standard says, Check of an unknown name is
NOT_FOUND and Watch of one answers SERVICE_UNKNOWN and stays open.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import trio
from grpc_health.v1 import health_pb2
from purerpc.grpclib.status import StatusCode

from jobworker.errors import RpcError, echo
from jobworker.server.auth import HEALTH_SERVICE
from jobworker.server.context import CallContext
from jobworker.server.service import Method, SendMessage
from jobworker.wire.contract import SERVICE_NAME

log = logging.getLogger(__name__)

ServingStatus = int  # health_pb2.HealthCheckResponse.ServingStatus values
SERVING: ServingStatus = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: ServingStatus = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: ServingStatus = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAMES = ("", SERVICE_NAME)  # "" is the server as a whole, as the standard defines
# At shutdown, how long watchers get to be handed NOT_SERVING before connections close: a
# watcher that does not read its stream gets no more than this.
NOT_SERVING_DELIVERY_S = 1.0


class Health:
    """The serving status, its Check/Watch/List RPCs, and the watchers to tell of changes."""

    def __init__(self) -> None:
        self._status: ServingStatus = NOT_SERVING
        self._version = 0  # bumped at each change
        self._changed = trio.Event()  # set (and replaced) at each change
        self._delivered: dict[int, int] = {}  # watcher -> version it has sent
        self._progress = trio.Event()  # set when a watcher catches up
        self._tokens = itertools.count()

    @property
    def status(self) -> ServingStatus:
        return self._status

    def methods(self) -> dict[tuple[str, str], Method]:
        """(service, method) -> Method, for the connection handler's table."""
        return {
            (HEALTH_SERVICE, "Check"): Method(health_pb2.HealthCheckRequest, unary=self.check),
            (HEALTH_SERVICE, "Watch"): Method(health_pb2.HealthCheckRequest, stream=self.watch),
            (HEALTH_SERVICE, "List"): Method(health_pb2.HealthListRequest, unary=self.list),
        }

    def set_serving(self) -> None:
        """Jobs can be accepted."""
        self._set(SERVING)

    async def shut_down(self) -> None:
        """NOT_SERVING; return once every Watch stream has sent it, or after
        NOT_SERVING_DELIVERY_S. Cancellation only cuts the wait short."""
        self._set(NOT_SERVING)
        with trio.move_on_after(NOT_SERVING_DELIVERY_S) as scope:
            while any(seen < self._version for seen in self._delivered.values()):
                progress = self._progress
                await progress.wait()
        if scope.cancelled_caught:
            behind = sum(seen < self._version for seen in self._delivered.values())
            log.info("health: %d watcher(s) not reading, NOT_SERVING not delivered", behind)

    def _set(self, status: ServingStatus) -> None:
        if status == self._status:
            return
        self._status = status
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()
        log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    def _lookup(self, service: str) -> ServingStatus:
        return self._status if service in SERVICE_NAMES else SERVICE_UNKNOWN

    async def check(self, request: Any, context: CallContext) -> Any:
        status = self._lookup(request.service)
        if status == SERVICE_UNKNOWN:
            raise RpcError(StatusCode.NOT_FOUND, f"unknown service: {echo(request.service)}")
        return health_pb2.HealthCheckResponse(status=status)

    async def list(self, request: Any, context: CallContext) -> Any:
        response = health_pb2.HealthListResponse()
        for name in SERVICE_NAMES:
            response.statuses[name].status = self._status
        return response

    async def watch(self, request: Any, send: SendMessage, context: CallContext) -> None:
        """The current status at once, then every change, until the client leaves (or the
        connection closes). A watcher that does not read blocks only itself, on flow
        control; on cancellation it is forgotten."""
        token = next(self._tokens)
        self._delivered[token] = -1
        sent: ServingStatus | None = None
        try:
            while True:
                version, changed = self._version, self._changed
                status = self._lookup(request.service)
                if status != sent:
                    await send(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                self._delivered[token] = version
                self._progress.set()
                self._progress = trio.Event()
                if version == self._version:
                    await changed.wait()
        finally:
            del self._delivered[token]
            self._progress.set()
            self._progress = trio.Event()
