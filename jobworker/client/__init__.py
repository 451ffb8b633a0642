"""The jobworker client: JobService over purerpc and mutual TLS on Trio.

``open_client(server, cert=, key=, ca=)`` gives a JobClient; errors are the
ClientError tree in ``jobworker.client.errors``.
"""

from __future__ import annotations

from jobworker.client.address import ServerAddress, parse_server
from jobworker.client.errors import (
    ClientError,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    RpcError,
    ServerShuttingDown,
)
from jobworker.client.jobs import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    ClientSession,
    JobClient,
    JobOutput,
    open_client,
)
from jobworker.wire.contract import DEFAULT_PORT

__all__ = [
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_PORT",
    "ClientError",
    "ClientSession",
    "ConnectError",
    "ConnectionLost",
    "DeadlineExceeded",
    "JobClient",
    "JobOutput",
    "RpcError",
    "ServerAddress",
    "ServerShuttingDown",
    "open_client",
    "parse_server",
]
