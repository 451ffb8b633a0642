"""The per-test time limit: a hung test fails by name and the run goes on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HANGING_TESTS = """
import time

import pytest
import trio

pytestmark = pytest.mark.time_limit(1)

async def test_hangs():
    await trio.sleep_forever()


async def test_after_a_hang_trio_still_works():
    await trio.sleep(0)


async def test_virtual_time_is_not_real_time(autojump_clock):
    await trio.sleep(10_000)


@pytest.fixture
async def stuck_teardown():
    yield
    await trio.sleep_forever()


async def test_fixture_teardown_hangs(stuck_teardown):
    pass


@pytest.mark.time_limit(30)
async def test_own_limit_is_honoured():
    with trio.move_on_after(1.5):
        await trio.sleep_forever()


def test_sync_hang():
    time.sleep(100)
"""


def test_hung_tests_fail_by_name_and_the_run_goes_on(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_inner=HANGING_TESTS)
    result = pytester.runpytest_subprocess("-p", "trio", "-p", "tests.timelimits", "-rf")
    result.assert_outcomes(passed=3, failed=3)
    failed = sorted(line.split()[1] for line in result.outlines if line.startswith("FAILED "))
    assert failed == [
        "test_inner.py::test_fixture_teardown_hangs",
        "test_inner.py::test_hangs",
        "test_inner.py::test_sync_hang",
    ]
    assert result.stdout.str().count("test exceeded its time limit of 1 s (hung?)") >= 2
