"""What every RPC handler is told about its call, by the one dispatcher (handler.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from jobworker.server.identity import Identity

__all__ = ["CallContext"]


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

    @property
    def role(self) -> str:
        """The caller's role as shown to people (``none`` without one)."""
        return self.identity.role_label

    def time_left(self) -> float:
        """Seconds until the deadline (``inf`` without one; never negative)."""
        return max(self.deadline - trio.current_time(), 0.0)
