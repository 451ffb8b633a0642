"""The request rate limiter: token buckets per client on Trio's clock, and its setting."""

from __future__ import annotations

import argparse

import pytest
import trio
import trio.testing

from jobworker.server.ratelimit import RateLimit, RateLimiter, parse_rate_limit, retry_after_ms


async def test_a_burst_passes_then_calls_wait_for_the_refill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(RateLimit(rate=10.0, burst=3))
    assert [limiter.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("alice")
    assert wait == pytest.approx(0.1)  # one token comes back every 1/rate s
    assert limiter.take("alice") == pytest.approx(0.1)  # a refused call takes nothing
    await trio.sleep(wait)
    assert limiter.take("alice") == 0.0  # exactly the hint is enough
    assert limiter.take("alice") == pytest.approx(0.1)


async def test_the_refill_never_exceeds_the_burst(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(RateLimit(rate=100.0, burst=2))
    limiter.take("alice")
    await trio.sleep(3600)
    assert [limiter.take("alice") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.take("alice") > 0


async def test_each_client_has_its_own_bucket(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=1))
    assert limiter.take("alice") == 0.0
    assert limiter.take("alice") == pytest.approx(1.0)
    assert limiter.take("bob") == 0.0  # alice's exhaustion costs bob nothing


async def test_a_partial_refill_shortens_the_hint(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(RateLimit(rate=2.0, burst=1))
    limiter.take("alice")
    await trio.sleep(0.3)  # 0.6 of a token back
    assert limiter.take("alice") == pytest.approx(0.2)


async def test_idle_clients_are_forgotten(autojump_clock: trio.testing.MockClock) -> None:
    """Memory stays bounded by the clients of the last refill time, however many came."""
    limiter = RateLimiter(RateLimit(rate=10.0, burst=5))  # refilled within 0.5 s
    for n in range(1000):
        limiter.take(f"client-{n}")
    assert len(limiter) == 1000
    await trio.sleep(0.6)
    limiter.take("newcomer")  # the sweep runs on the next call once due
    assert len(limiter) == 1


async def test_a_sweep_keeps_what_a_refilling_client_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=2))  # refilled within 2 s
    limiter.take("alice")  # the first call sweeps (nothing yet): the next sweep is due at 2 s
    await trio.sleep(1.9)
    limiter.take("bob")
    limiter.take("bob")  # bob is empty at 1.9 s
    await trio.sleep(0.2)
    limiter.take("carol")  # 2.1 s: the sweep drops alice (full again), keeps bob (0.2 token)
    assert len(limiter) == 2
    assert limiter.take("bob") == pytest.approx(0.8)  # not a fresh bucket


@pytest.mark.parametrize(
    ("seconds", "ms"), [(0.0001, 1), (0.05, 50), (0.0501, 51), (1.5, 1500), (1e-12, 1)]
)
def test_retry_hints_are_whole_milliseconds_rounded_up(seconds: float, ms: int) -> None:
    assert retry_after_ms(seconds) == ms


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("20/s,40", RateLimit(20.0, 40)),
        ("20,40", RateLimit(20.0, 40)),
        ("0.5/s,1", RateLimit(0.5, 1)),
        (" 3 / s , 9 ", RateLimit(3.0, 9)),
    ],
)
def test_the_setting_reads_rate_and_burst(text: str, limit: RateLimit) -> None:
    assert parse_rate_limit(text) == limit
    assert parse_rate_limit(str(limit)) == limit  # what --print-config writes reads back


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("20/s", "expected RATE[/s],BURST (e.g. 20/s,40), got '20/s'"),
        ("20/m,40", "expected RATE[/s],BURST"),
        ("0/s,5", "the rate must be > 0 calls per second: '0/s,5'"),
        ("5/s,0", "the burst must be at least 1 call: '5/s,0'"),
        ("5/s,2.5", "expected RATE[/s],BURST"),
        ("-1/s,5", "expected RATE[/s],BURST"),
    ],
)
def test_a_bad_setting_says_why(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse_rate_limit(text)
    assert str(caught.value).startswith(message)
