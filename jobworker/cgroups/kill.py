"""Kill-until-empty: the part of stopping a job that both drivers share.

Every loop here is bounded by a deadline: kill() is called from shielded cleanup and must
return in bounded time even if the kernel keeps a process alive (D state); survivors are logged.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from jobworker.cgroups.cgfs import signal_pids

log = logging.getLogger(__name__)

# How often to look at cgroup.procs while waiting: short, so kill() returns within a few
# milliseconds of the last process exiting (the grace period is a maximum, not a delay).
POLL_INTERVAL_S = 0.002
# Upper bound on the SIGKILL phase; processes normally die within ~5-20 ms.
HARD_KILL_TIMEOUT_S = 5.0
# After one freeze/SIGKILL/thaw round, how long to wait for the procs list to drain
# before the next round.
ROUND_WAIT_S = 0.1


async def wait_until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll ``predicate`` every POLL_INTERVAL_S until true or ``within`` seconds passed;
    return its last value."""
    deadline = trio.current_time() + within
    while not predicate():
        if trio.current_time() >= deadline:
            return predicate()
        await trio.sleep(POLL_INTERVAL_S)
    return True


async def terminate_phase(list_pids: Callable[[], set[int]], grace: float) -> bool:
    """SIGTERM every process (and every newly forked one) until empty or ``grace`` passed.

    Returns True when the cgroup emptied. A pid is sent SIGTERM once: re-sending to a process
    that ignores it changes nothing.
    """
    deadline = trio.current_time() + grace
    signalled: set[int] = set()
    while True:
        pids = list_pids()
        if not pids:
            return True
        fresh = pids - signalled
        signal_pids(fresh, signal.SIGTERM)
        signalled |= fresh
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(POLL_INTERVAL_S)


async def kill_rounds(
    list_pids: Callable[[], set[int]],
    kill_round: Callable[[], Awaitable[None]],
    what: str,
) -> bool:
    """Run ``kill_round`` (freeze + SIGKILL + thaw, or cgroup.kill) until ``list_pids`` is empty.

    Bounded by HARD_KILL_TIMEOUT_S; logs survivors and returns False if any remain.
    """
    deadline = trio.current_time() + HARD_KILL_TIMEOUT_S
    while list_pids():
        if trio.current_time() >= deadline:
            log.error("%s: processes survived SIGKILL: %s", what, sorted(list_pids()))
            return False
        await kill_round()
        await wait_until(lambda: not list_pids(), ROUND_WAIT_S)
    return True
