"""A time limit for every test, so that a hang fails that test, names it, and the run goes on.

Loaded as a pytest plugin by tests/conftest.py. The default is generous: only something stuck
reaches it. A test that legitimately takes longer says so with
``@pytest.mark.time_limit(SECONDS)``.

Trio tests are cancelled as a whole (fixtures included) when their limit passes, measured in real
time by a thread rather than by Trio's clock, so tests on ``autojump_clock`` are bounded too and
never cut short by a jumping clock. If a cancelled test's cleanup is stuck as well (a shielded
wait that never ends), pytest-timeout's thread method dumps every stack and ends the run a
margin later. Synchronous tests use pytest-timeout's signal method, which fails just that test.
(The signal method cannot serve trio tests: an exception raised from a signal handler inside
Trio's run loop breaks the loop for every later test.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

DEFAULT_TIME_LIMIT_S = 60.0
BACKSTOP_MARGIN_S = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"time_limit(seconds): this test's own time limit (default {DEFAULT_TIME_LIMIT_S:g} s)",
    )


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("time_limit")
    return float(marker.args[0]) if marker is not None else DEFAULT_TIME_LIMIT_S


def _bounded_trio_run(limit: float) -> Callable[..., Any]:
    """A ``trio.run`` for pytest-trio that cancels the whole test after `limit` seconds."""

    def run(fn: Callable[[], Awaitable[Any]], **kwargs: Any) -> Any:
        async def main() -> Any:
            token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:

                def expire() -> None:
                    # the run may have finished between the timer firing and this call
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(scope.cancel)

                timer = threading.Timer(limit, expire)
                timer.daemon = True
                timer.start()
                try:
                    return await fn()
                finally:
                    timer.cancel()
            pytest.fail(f"test exceeded its time limit of {limit:g} s (hung?)", pytrace=False)

        return trio.run(main, **kwargs)

    return run


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        limit = _time_limit(item)
        if item.get_closest_marker("trio") is not None:
            # Prepended, so that pytest-trio finds this runner before the one trio_mode adds.
            item.add_marker(pytest.mark.trio(run=_bounded_trio_run(limit)), append=False)
            item.add_marker(pytest.mark.timeout(limit + BACKSTOP_MARGIN_S, method="thread"))
        else:
            item.add_marker(pytest.mark.timeout(limit, method="signal"))
