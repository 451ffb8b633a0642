"""The memory janitor runs only after churn, at most once per period."""

from __future__ import annotations

import trio
import trio.testing

from jobworker.server.janitor import MemoryJanitor


async def test_janitor_collects_only_after_churn(autojump_clock: trio.testing.MockClock) -> None:
    janitor = MemoryJanitor(period=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(janitor.run)
        await trio.sleep(5)
        assert janitor.runs == 0  # nothing happened: nothing to give back
        janitor.note_churn()
        janitor.note_churn()
        await trio.sleep(2.5)
        assert janitor.runs == 1  # one run for any number of connections in a period
        await trio.sleep(10)
        assert janitor.runs == 1
        nursery.cancel_scope.cancel()


def test_collect_gives_memory_back_without_error() -> None:
    janitor = MemoryJanitor()
    janitor.collect()
    assert janitor.runs == 1
