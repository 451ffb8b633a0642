"""What every RPC handler is told about its call, by the one dispatcher (handler.py)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import trio

from jobworker.server.identity import Identity

__all__ = ["CallContext"]

# Custom metadata we send: lower-case ASCII names (as HTTP/2 requires), never gRPC's own
# (grpc-*), text values only (no -bin), printable ASCII as the gRPC protocol allows.
_NAME = re.compile(r"[0-9a-z_.-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")


def _checked(name: str, value: str) -> tuple[str, str]:
    if not _NAME.fullmatch(name) or name.startswith("grpc-") or name.endswith("-bin"):
        raise ValueError(f"not a custom text metadata name: {name!r}")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"metadata {name}: not printable ASCII: {value!r}")
    return name, value


@dataclass(frozen=True)
class CallContext:
    """One call: who makes it (identity and role, from the verified certificate), until when
    (``deadline`` on Trio's clock, ``inf`` for none), from where (``peer``, the client's
    address) and what it calls (``service``, ``method``). The role has already been checked
    against the role table when a handler sees this."""

    identity: Identity
    service: str
    method: str
    deadline: float = math.inf
    peer: str = ""
    # Custom metadata the handler sends back (add_header, add_trailer): the one mutable part.
    headers: list[tuple[str, str]] = field(default_factory=list, compare=False, repr=False)
    trailers: list[tuple[str, str]] = field(default_factory=list, compare=False, repr=False)
    error_trailers: list[tuple[str, str]] = field(default_factory=list, compare=False, repr=False)

    @property
    def role(self) -> str:
        """The caller's role as shown to people (``none`` without one)."""
        return self.identity.role_label

    def time_left(self) -> float:
        """Seconds until the deadline (``inf`` without one; never negative)."""
        return max(self.deadline - trio.current_time(), 0.0)

    def add_header(self, name: str, value: str) -> None:
        """Send ``name: value`` with the response headers. Takes effect only before the first
        response message; a call that ends OK without any message sends it in its trailers."""
        self.headers.append(_checked(name, value))

    def add_trailer(self, name: str, value: str) -> None:
        """Send ``name: value`` in the trailers, if the call ends OK (not with an error).
        Raises ValueError for a name or value that metadata cannot carry."""
        self.trailers.append(_checked(name, value))

    def add_error_trailer(self, name: str, value: str) -> None:
        """Send ``name: value`` in the trailers if the call ends with an error (not OK): what
        the error means for the client, such as when to retry. Raises ValueError as
        ``add_trailer`` does."""
        self.error_trailers.append(_checked(name, value))
