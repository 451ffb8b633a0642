"""Request rate limiting per client identity: one token bucket per certificate CN.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; each call takes one,
and a call that finds less than one token is refused with the time until there will be one.
Time is Trio's clock. A bucket that has filled up again is the same as no bucket, so such
buckets are dropped (at most once per refill time, in one pass): what the limiter holds is
bounded by the clients seen within the last ``burst / rate`` seconds.

The setting's text, for the flag, the environment and the config file alike, is
``RATE[/s],BURST`` (``20/s,40``: 20 calls a second on average, 40 at once).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import trio

__all__ = ["RateLimit", "RateLimiter", "parse_rate_limit", "retry_after_ms"]

# Float rounding slack, in tokens: a client that waits exactly the time it was told gets
# its token.
_SLACK = 1e-9

_SETTING = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*s)?\s*,\s*([0-9]+)\s*")


@dataclass(frozen=True)
class RateLimit:
    """``rate`` calls per second on average, ``burst`` at once. ``str()`` is the setting's
    text, which ``parse_rate_limit`` reads back."""

    rate: float
    burst: int

    def __str__(self) -> str:
        return f"{self.rate:g}/s,{self.burst}"


def parse_rate_limit(text: str) -> RateLimit:
    """``RATE[/s],BURST`` -> RateLimit (an argparse type: ArgumentTypeError saying why)."""
    match = _SETTING.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected RATE[/s],BURST (e.g. 20/s,40), got {text!r}")
    rate, burst = float(match.group(1)), int(match.group(2))
    if not (rate > 0 and math.isfinite(rate)):
        raise argparse.ArgumentTypeError(f"the rate must be > 0 calls per second: {text!r}")
    if burst < 1:
        raise argparse.ArgumentTypeError(f"the burst must be at least 1 call: {text!r}")
    return RateLimit(rate, burst)


@dataclass
class _Bucket:
    tokens: float
    stamp: float  # when ``tokens`` was counted


class RateLimiter:
    """Token buckets, one per key (a client's CN), all of one RateLimit."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._buckets: dict[str, _Bucket] = {}
        self._refill_s = limit.burst / limit.rate  # an empty bucket is full again after this
        self._next_sweep = -math.inf

    def take(self, key: str) -> float:
        """Take a token from ``key``'s bucket: 0.0 if there was one (the call may go on),
        else the seconds until there will be one (nothing is taken: a refused call costs
        nothing)."""
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.limit.burst), now)
        else:
            elapsed = now - bucket.stamp
            bucket.tokens = min(self.limit.burst, bucket.tokens + elapsed * self.limit.rate)
            bucket.stamp = now
        if bucket.tokens >= 1 - _SLACK:
            bucket.tokens = max(bucket.tokens - 1, 0.0)
            return 0.0
        return (1 - bucket.tokens) / self.limit.rate

    def _sweep(self, now: float) -> None:
        """Drop the buckets that are full by now (a full bucket and none are the same)."""
        rate, burst = self.limit.rate, self.limit.burst
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.stamp) * rate < burst
        }
        self._next_sweep = now + self._refill_s

    def __len__(self) -> int:
        """How many buckets are held (clients seen that have not refilled yet, and some
        that have, until the next sweep)."""
        return len(self._buckets)


def retry_after_ms(seconds: float) -> int:
    """A wait as whole milliseconds for a client: rounded up, at least 1 (after that long
    a token is there)."""
    return max(math.ceil(seconds * 1000), 1)
