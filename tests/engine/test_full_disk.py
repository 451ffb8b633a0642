"""The engine on a data disk that is really full (a small tmpfs the test mounts as root)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.engine import JobStatus, open_job_manager
from jobworker.errors import DataDiskFull
from tests.support import fill, fill_completely, mounted_tmpfs

from .helpers import sh, wait_ended, wait_output, wait_until

LOSS = "bytes of output lost: data disk full"
# The gate is in the job's own work dir (its cwd).
LINES_UNTIL_DONE = (
    "i=0; while [ ! -e done ]; do echo line $i; i=$((i+1)); sleep 0.01; done; echo end"
)


@pytest.fixture
def tmpfs(data_dir: Path) -> Iterator[Path]:
    with mounted_tmpfs(data_dir) as mounted:
        yield mounted


async def test_a_disk_that_fills_up_before_the_jobs_files_are_made_refuses_without_an_id(
    tmpfs: Path,
) -> None:
    # A floor of 0 lets the create past its free-space check onto a disk already full: the
    # race of a disk filling up between that check and the job's first files, made certain.
    async with open_job_manager(tmpfs, min_free_disk=0) as manager:
        fillers = fill_completely(tmpfs)
        with pytest.raises(DataDiskFull, match=r"^data disk full$"):
            await manager.create(sh("true"))
        assert manager.list() == []
        assert list((tmpfs / "jobs").iterdir()) == []  # nothing left of it on disk
        for filler in fillers:
            filler.unlink()
        job = await manager.create(sh("true"))
        assert job.id == "1"  # the refused create used no id
        assert (await wait_ended(manager, "1")).status is JobStatus.COMPLETED


async def test_the_first_output_loss_sets_the_reason_while_the_job_runs(tmpfs: Path) -> None:
    async with open_job_manager(tmpfs, min_free_disk=0) as manager:
        await manager.create(sh(LINES_UNTIL_DONE))
        await wait_output(manager, "1", b"line 5\n")
        fill(tmpfs / "filler")
        await wait_until(lambda: LOSS in manager.get("1").reason)
        running = manager.get("1")
        assert running.status is JobStatus.RUNNING
        (tmpfs / "filler").unlink()
        (tmpfs / "jobs" / "1" / "work" / "done").touch()
        final = await wait_ended(manager, "1")
        await manager._jobs["1"].ended.wait()
    lost = manager._jobs["1"].output.lost_bytes
    assert running.reason.endswith(LOSS)
    assert final.reason == f"exited with status 0; {lost} {LOSS}"
