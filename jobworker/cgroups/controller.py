"""What the v1 and v2 controllers share: the IO device list, and finding, sweeping and removing
job cgroups under their roots."""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import JobCgroup
from jobworker.cgroups.blockdev import log_io_coverage, writable_block_devices
from jobworker.cgroups.layout import MOUNTINFO, parse_mountinfo

log = logging.getLogger(__name__)

# Making a job's directory when another server's sweep may remove our (empty) subtree at the
# same moment: each attempt makes the missing parents again.
MKDIR_ATTEMPTS = 3


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
        """Kill the processes of every leftover ``<root_name>/*`` cgroup and remove it; remove
        the empty subtrees of other instances (see remove_empty_siblings)."""
        swept = self.existing_job_ids()
        for job_id in swept:
            cgroup = self._leftover(job_id)
            await cgroup.kill(0)
            await cgroup.remove()
        self.remove_empty_siblings()
        return swept  # the caller logs them (the engine, once, for every driver)

    def remove_empty_siblings(self) -> int:
        """Remove the empty subtrees of other instances next to ours (``root_name`` nested, as
        ``jobworker/<instance>``): what a server killed during its start, or one whose data dir
        is gone, leaves behind. Returns how many were removed (logged).

        Only an empty cgroup can be removed (the kernel refuses one with processes or child
        cgroups), so the jobs of another running server are never touched; a running server
        whose empty subtree goes makes it again at its next job (``_make_job_dir``).
        """
        removed: set[str] = set()
        for root in self.roots():
            if len(Path(self.root_name).parts) < 2:
                continue  # our subtree is directly in our own cgroup: its siblings are not ours
            try:
                entries = [e for e in os.scandir(root.parent) if e.is_dir()]
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name == root.name:
                    continue
                try:
                    os.rmdir(entry.path)
                except OSError:
                    continue  # in use (jobs below it), or already gone
                removed.add(entry.name)
        if removed:
            log.info(
                "removed %d empty job-cgroup subtree(s) of other servers: %s",
                len(removed),
                ", ".join(sorted(removed)),
            )
        return len(removed)

    @staticmethod
    def _make_job_dir(directory: Path) -> None:
        """mkdir a job's cgroup, making its subtree again if it is gone (OSError if not)."""
        for attempt in range(MKDIR_ATTEMPTS):
            try:
                directory.mkdir()
                return
            except FileNotFoundError:
                if attempt == MKDIR_ATTEMPTS - 1:
                    raise
                directory.parent.mkdir(parents=True, exist_ok=True)

    async def remove_roots(self) -> None:
        """Remove the (empty) ``<root_name>`` directories: at clean shutdown, and in tests."""
        await cgfs.remove_dirs(self.roots())
