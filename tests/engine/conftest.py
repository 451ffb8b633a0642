"""Fixtures for the engine tests: a job manager on a fresh data dir, no cgroups."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.engine import JobManager, open_job_manager


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def manager(data_dir: Path) -> AsyncIterator[JobManager]:
    async with open_job_manager(data_dir) as job_manager:
        yield job_manager
