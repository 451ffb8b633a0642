"""Which block devices an IO limit must cover: every whole disk behind a writable filesystem.

Throttling works per device (MAJ:MIN of a whole disk; the kernel refuses partitions on some
kernels and anonymous devices such as tmpfs/overlay's 0:N with ENODEV). Computed once per
controller: the mount table of a server rarely changes, and per job it would cost a
mountinfo parse.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jobworker.cgroups.layout import Mount

log = logging.getLogger(__name__)

SYS_DEV_BLOCK = Path("/sys/dev/block")

# Kernel pseudo-filesystems a job cannot fill with IO worth throttling: not worth a log line.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "securityfs", "debugfs", "tracefs",
        "bpf", "pstore", "mqueue", "configfs", "fusectl", "hugetlbfs", "binfmt_misc",
        "autofs", "nsfs", "efivarfs", "rpc_pipefs",
    }
)  # fmt: skip


def whole_disk(major: int, minor: int, sys_dev_block: Path = SYS_DEV_BLOCK) -> str | None:
    """ "MAJ:MIN" of the whole disk holding device major:minor, or None if not a block device."""
    node = sys_dev_block / f"{major}:{minor}"
    if not node.exists():
        return None
    if (node / "partition").exists():
        # /sys/dev/block/M:m -> .../block/vda/vda1; the parent directory is the disk.
        parent_dev = node.resolve().parent / "dev"
        try:
            return parent_dev.read_text().strip()
        except OSError:
            return None
    return f"{major}:{minor}"


def writable_block_devices(
    mounts: list[Mount], sys_dev_block: Path = SYS_DEV_BLOCK
) -> tuple[list[str], list[str]]:
    """(whole-disk "MAJ:MIN" list, descriptions of writable mounts that cannot be throttled)."""
    devices: list[str] = []
    skipped: list[str] = []
    for mount in mounts:
        if not mount.writable or mount.fstype in PSEUDO_FILESYSTEMS:
            continue
        disk = None if mount.major == 0 else whole_disk(mount.major, mount.minor, sys_dev_block)
        if disk is None:
            skipped.append(f"{mount.mount_point} ({mount.fstype} {mount.major}:{mount.minor})")
        elif disk not in devices:
            devices.append(disk)
    return devices, skipped


def log_io_coverage(devices: list[str], skipped: list[str]) -> None:
    log.info("IO limits apply to block devices: %s", ", ".join(devices) or "none")
    if skipped:
        log.info("IO to these mounts is not throttled (no block device): %s", ", ".join(skipped))
