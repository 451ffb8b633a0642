"""The keepalive state machine, in-process: PINGs due after quiet, a dead peer found in time +
timeout, and the peer's PING flood struck out (forgiven while RPCs progress)."""

from __future__ import annotations

from jobworker.wire.keepalive import Keepalive, KeepalivePolicy

POLICY = KeepalivePolicy(time=10.0, timeout=2.0, min_ping_interval=1.0, max_strikes=2)


def test_a_ping_is_due_after_quiet_and_activity_postpones_it() -> None:
    keepalive = Keepalive(POLICY, now=0.0)
    assert keepalive.next_ping_at() == 10.0
    keepalive.received(4.0)
    assert keepalive.next_ping_at() == 14.0


def test_an_answered_ping_keeps_the_peer_alive_and_an_unanswered_one_kills_it() -> None:
    keepalive = Keepalive(POLICY, now=0.0)
    payload = keepalive.ping_sent(10.0)
    assert len(payload) == 8
    assert keepalive.next_ping_at() == float("inf")  # one PING at a time
    assert not keepalive.dead(11.9)
    assert not keepalive.ack_received(b"12345678")  # not ours
    assert keepalive.ack_received(payload)
    assert not keepalive.dead(100.0)
    keepalive.received(10.5)
    assert keepalive.next_ping_at() == 20.5
    keepalive.ping_sent(20.5)
    assert not keepalive.dead(22.4)
    assert keepalive.dead(22.5)  # time + timeout after the last sign of life


def test_the_third_too_early_ping_is_a_flood() -> None:
    keepalive = Keepalive(POLICY, now=0.0)
    assert not keepalive.peer_pinged(0.0)
    assert not keepalive.peer_pinged(0.1)  # strike 1
    assert not keepalive.peer_pinged(0.2)  # strike 2
    assert keepalive.peer_pinged(0.3)  # strike 3: GOAWAY


def test_pings_at_the_minimum_interval_are_fine() -> None:
    keepalive = Keepalive(POLICY, now=0.0)
    assert not any(keepalive.peer_pinged(float(t)) for t in range(100))


def test_strikes_are_forgiven_while_rpcs_progress() -> None:
    keepalive = Keepalive(POLICY, now=0.0)
    for n in range(10):
        assert not keepalive.peer_pinged(n * 0.1)
        keepalive.sent_headers_or_data()


def test_no_enforcement_with_a_zero_interval() -> None:
    keepalive = Keepalive(KeepalivePolicy(min_ping_interval=0.0), now=0.0)
    assert not any(keepalive.peer_pinged(t / 1000) for t in range(1000))
