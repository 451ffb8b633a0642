"""HTTP/2 keepalive, sans-IO: when to PING a quiet peer, when it is dead, and when a peer's
own PINGs are a flood.

- A connection on which nothing was received for ``time`` seconds gets a PING; a peer that
  does not acknowledge it within ``timeout`` is dead (its connection is closed). A dead peer
  holding a stream blocked on flow control is found this way in time + timeout, not after
  TCP's own keepalive (hours) or retransmission limit (~15 minutes).
- The peer's PINGs are answered (h2 does it), but one that comes less than
  ``min_ping_interval`` after the previous one is a strike, and more than ``max_strikes``
  strikes get GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"), as grpc-go's enforcement policy
  does. Strikes are forgiven whenever we send headers or data: a client pinging while its
  RPCs make progress is not flooding.

Times are plain floats from the caller's clock (trio.current_time()).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "DEFAULT_KEEPALIVE_MIN_PING_INTERVAL_S",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_KEEPALIVE_TIME_S",
    "TOO_MANY_PINGS",
    "Keepalive",
    "KeepalivePolicy",
]

DEFAULT_KEEPALIVE_TIME_S = 7200.0  # gRPC's default: two hours
DEFAULT_KEEPALIVE_TIMEOUT_S = 20.0  # gRPC's default
# Legitimate keepalives are seconds apart; a quarter second is a flood's, not a client's.
DEFAULT_KEEPALIVE_MIN_PING_INTERVAL_S = 0.25
MAX_PING_STRIKES = 2  # grpc-go's: the third too-early PING gets GOAWAY
TOO_MANY_PINGS = b"too_many_pings"  # GOAWAY debug data, as grpc-go sends it


@dataclass(frozen=True)
class KeepalivePolicy:
    time: float = DEFAULT_KEEPALIVE_TIME_S
    timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    min_ping_interval: float = DEFAULT_KEEPALIVE_MIN_PING_INTERVAL_S  # 0: no enforcement
    max_strikes: int = MAX_PING_STRIKES


class Keepalive:
    """One connection's keepalive state."""

    def __init__(self, policy: KeepalivePolicy, now: float) -> None:
        self.policy = policy
        self._last_received = now
        self._outstanding: bytes | None = None  # payload of our unanswered PING
        self._sent_at = 0.0
        self._last_peer_ping: float | None = None
        self._strikes = 0

    def received(self, now: float) -> None:
        """Bytes came from the peer: it is alive."""
        self._last_received = now

    def next_ping_at(self) -> float:
        """When a PING is due if nothing arrives before (while one is outstanding: never)."""
        if self._outstanding is not None:
            return float("inf")
        return self._last_received + self.policy.time

    def ping_sent(self, now: float) -> bytes:
        """Record a PING sent now; return its 8-byte payload."""
        self._outstanding = os.urandom(8)
        self._sent_at = now
        return self._outstanding

    def ack_received(self, payload: bytes) -> bool:
        """The peer acknowledged a PING; True if it was ours and outstanding."""
        if self._outstanding is not None and payload == self._outstanding:
            self._outstanding = None
            return True
        return False

    @property
    def waiting_for_ack(self) -> bool:
        return self._outstanding is not None

    def dead(self, now: float) -> bool:
        """Our PING has gone unanswered for longer than the timeout."""
        return self._outstanding is not None and now - self._sent_at >= self.policy.timeout

    def peer_pinged(self, now: float) -> bool:
        """The peer sent a PING (not an ACK). True when that makes it a flood: the caller
        sends GOAWAY ENHANCE_YOUR_CALM and closes the connection."""
        interval = self.policy.min_ping_interval
        previous, self._last_peer_ping = self._last_peer_ping, now
        if interval <= 0 or previous is None or now - previous >= interval:
            return False
        self._strikes += 1
        return self._strikes > self.policy.max_strikes

    def sent_headers_or_data(self) -> None:
        """We sent HEADERS or DATA: the peer's RPCs progress, its PINGs are forgiven."""
        self._strikes = 0
        self._last_peer_ping = None
