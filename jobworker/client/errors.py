"""The errors a JobClient raises: one tree, messages written for people.

``ClientError`` is the base; the CLI prints ``Error: <str(err)>`` and picks its
exit status from the class. Nothing here carries a traceback or a repr of
server internals: a server-reported status is shown as the server worded it.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error the client module raises. str(err) is the message for people."""


class RpcError(ClientError):
    """Raised when the server ends a call with a non-OK gRPC status.

    ``code_name`` is the status name (``NOT_FOUND``, ``PERMISSION_DENIED``, ...);
    ``message`` is the server's message, e.g. ``job not found: 999``.
    """

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(message or code_name.lower().replace("_", " "))
        self.code_name = code_name
        self.message = message


class DeadlineExceeded(RpcError):
    """Raised when a unary call gets no complete answer within its deadline.

    The call is cancelled (RST_STREAM) before this is raised; the server was
    told the same deadline in ``grpc-timeout``.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__("DEADLINE_EXCEEDED", f"deadline exceeded: no answer within {timeout:g} s")
        self.timeout = timeout


class ServerShuttingDown(RpcError):
    """Raised when the server ends a call because it is going away: a status UNAVAILABLE
    ``server shutting down``, UNAVAILABLE after the server announced a graceful close
    (GOAWAY with NO_ERROR), or the connection ending after such a GOAWAY before the call
    finished. The call may be retried once the server is back. Message: ``server shutting
    down``; ``code_name`` is UNAVAILABLE, as grpc clients report it.
    """

    def __init__(self) -> None:
        super().__init__("UNAVAILABLE", SHUTDOWN_MESSAGE)


SHUTDOWN_MESSAGE = "server shutting down"  # the server's words for it, too


class ConnectError(ClientError):
    """Raised by open_client when no usable connection could be set up.

    Messages say which step failed: ``cannot connect to host:port: ...``,
    ``certificate verify failed: ...`` (the server's certificate),
    ``TLS handshake refused by server: ...`` (our certificate),
    ``missing certificate file at PATH``, ``certificate file is a directory: PATH``,
    ``cannot load certificate PATH: not a PEM certificate``, ``cannot load key PATH: ...``,
    ``key PATH does not match certificate PATH``.
    """


class ConnectionLost(ClientError):
    """Raised by every call in progress (and every later call) once the connection has dropped."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"connection lost: {detail}" if detail else "connection lost")
        self.detail = detail
