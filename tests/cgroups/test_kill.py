"""Kill-until-empty with real processes: a survivor of the first round gets a second one."""

from __future__ import annotations

import os
import signal
import subprocess

import trio

from jobworker.cgroups.kill import kill_rounds
from tests.support import pid_alive

from .helpers import spawn


async def test_a_survivor_of_the_first_round_is_killed_by_the_next() -> None:
    """Round one misses a process (one forked after the round listed the cgroup, say): the
    loop must look again and kill it, not trust that one round was enough."""
    procs = [await spawn(["sleep", "1000"], stdout=subprocess.DEVNULL) for _ in range(2)]
    pids = {p.pid for p in procs}
    rounds: list[set[int]] = []

    def live() -> set[int]:
        for proc in procs:
            proc.poll()  # reap: a zombie is not a survivor
        return {pid for pid in pids if pid_alive(pid)}

    async def kill_round() -> None:
        # The first round reaches only the first process; later rounds reach everything.
        targets = {procs[0].pid} if not rounds else live()
        rounds.append(targets)
        for pid in targets:
            os.kill(pid, signal.SIGKILL)

    try:
        with trio.fail_after(10):
            assert await kill_rounds(live, kill_round, "test job")
        assert rounds == [{procs[0].pid}, {procs[1].pid}]
        assert live() == set()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
