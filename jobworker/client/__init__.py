"""The jobworker client: JobService over purerpc and mutual TLS on Trio.

``open_client(server, cert=, key=, ca=)`` gives a JobClient; every error it raises is
an RpcError of the one tree in ``jobworker.errors``.
"""

from __future__ import annotations

from jobworker.client.address import ServerAddress, parse_server
from jobworker.client.jobs import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    JobClient,
    JobOutput,
    new_request_id,
    open_client,
)
from jobworker.errors import (
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    RpcError,
    ServerShuttingDown,
)
from jobworker.wire.contract import DEFAULT_PORT

__all__ = [
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_PORT",
    "ConnectError",
    "ConnectionLost",
    "DeadlineExceeded",
    "JobClient",
    "JobOutput",
    "RpcError",
    "ServerAddress",
    "ServerShuttingDown",
    "new_request_id",
    "open_client",
    "parse_server",
]
