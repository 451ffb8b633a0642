"""What the v1 and v2 controllers share: the IO device list, and finding, sweeping and removing
job cgroups under their roots."""

from __future__ import annotations

import abc
import os
from pathlib import Path

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import JobCgroup
from jobworker.cgroups.blockdev import log_io_coverage, writable_block_devices
from jobworker.cgroups.layout import MOUNTINFO, parse_mountinfo


class CgroupController(abc.ABC):
    """Base of the real drivers. Subclasses say where their roots are and how to address a
    leftover job cgroup; the rest is the same in v1 and v2."""

    root_name: str
    _io_devices: list[str] | None

    @abc.abstractmethod
    def roots(self) -> list[Path]:
        """``<own>/<root_name>`` in each hierarchy used (deduplicated)."""

    @abc.abstractmethod
    def _leftover(self, job_id: str) -> JobCgroup:
        """The job cgroup ``job_id`` as found on disk (to kill and remove it)."""

    def io_devices(self) -> list[str]:
        """Whole block devices behind writable mounts ("MAJ:MIN"), computed once."""
        if self._io_devices is None:
            devices, skipped = writable_block_devices(parse_mountinfo(MOUNTINFO.read_text()))
            log_io_coverage(devices, skipped)
            self._io_devices = devices
        return self._io_devices

    def existing_job_ids(self) -> list[str]:
        ids: set[str] = set()
        for root in self.roots():
            try:
                ids.update(e.name for e in os.scandir(root) if e.is_dir())
            except FileNotFoundError:
                continue
        return sorted(ids, key=lambda s: (len(s), s))

    async def sweep(self) -> list[str]:
        """Kill the processes of every leftover ``<root_name>/*`` cgroup and remove it."""
        swept = self.existing_job_ids()
        for job_id in swept:
            cgroup = self._leftover(job_id)
            await cgroup.kill(0)
            await cgroup.remove()
        return swept  # the caller logs them (the engine, once, for every driver)

    async def remove_roots(self) -> None:
        """Remove the (empty) ``<root_name>`` directories: at clean shutdown, and in tests."""
        await cgfs.remove_dirs(self.roots())
