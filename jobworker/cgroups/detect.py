"""Choose the resource-control driver at server start.

v1 when the memory controller is mounted as a v1 hierarchy (our hybrid hosts: the unified
mount there has no controllers), else v2 when a cgroup2 mount offers controllers. "Usable"
is decided by trying: mkdir + rmdir of a probe cgroup in every hierarchy used.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from jobworker.cgroups.layout import (
    MOUNTINFO,
    PROC_SELF_CGROUP,
    V1_CONTROLLERS,
    parse_mountinfo,
    parse_proc_cgroup,
    v1_hierarchies,
    v2_hierarchy,
)
from jobworker.cgroups.v1 import V1Controller
from jobworker.cgroups.v2 import V2Controller

if TYPE_CHECKING:
    from jobworker.cgroups.base import ResourceController

log = logging.getLogger(__name__)

CgroupMode = Literal["auto", "require", "off"]
# Without these a job's limits (memory above all) would not hold: v1 needs them all mounted.
V1_REQUIRED = frozenset({"cpu", "cpuacct", "memory", "pids", "freezer"})
V2_REQUIRED = frozenset({"cpu", "memory", "pids"})


class CgroupsUnavailable(RuntimeError):
    """Raised by ``detect_controller("require")`` when no cgroup hierarchy is usable."""


def _find_real_controller(
    root_name: str, pids_max: int | None
) -> tuple[V1Controller | V2Controller | None, str]:
    """The usable driver, or None and the reason why not."""
    try:
        mounts = parse_mountinfo(MOUNTINFO.read_text())
        own_paths = parse_proc_cgroup(PROC_SELF_CGROUP.read_text())
    except OSError as exc:
        return None, f"cannot read the cgroup layout: {exc.strerror}"
    v1 = v1_hierarchies(mounts, own_paths, V1_CONTROLLERS)
    if "memory" in v1:
        missing = V1_REQUIRED - v1.keys()
        if missing:
            return None, f"cgroup v1 controllers not mounted: {', '.join(sorted(missing))}"
        controller = V1Controller(v1, root_name=root_name, pids_max=pids_max)
        try:
            controller.probe()
        except OSError as exc:
            return None, f"cannot create cgroup v1 job cgroups: {exc.strerror}"
        return controller, ""
    unified = v2_hierarchy(mounts, own_paths)
    if unified is None:
        return None, "no cgroup hierarchy is mounted"
    v2 = V2Controller(unified, root_name=root_name, pids_max=pids_max)
    missing = V2_REQUIRED - v2.controllers
    if missing:
        return None, f"cgroup v2 controllers not available: {', '.join(sorted(missing))}"
    try:
        v2.setup()
        v2.probe()
    except OSError as exc:
        return None, f"cannot set up cgroup v2 job cgroups: {exc.strerror}"
    return v2, ""


def detect_controller(
    mode: CgroupMode = "auto", *, pids_max: int | None = None, root_name: str = "jobworker"
) -> ResourceController:
    """The resource controller for this host.

    ``auto``: a real driver if one is usable, else the null driver with a loud warning that
    limits are not enforced. ``require``: a real driver or CgroupsUnavailable. ``off``: the
    null driver. ``pids_max`` (server-wide) overrides Limits.pids_max for every job.
    """
    if mode not in ("auto", "require", "off"):
        raise ValueError(f"unknown cgroups mode: {mode}")
    if mode != "off":
        controller, why = _find_real_controller(root_name, pids_max)
        if controller is not None:
            return controller  # described once, by the job manager that uses it
        if mode == "require":
            raise CgroupsUnavailable(f"cgroups required but unusable: {why}")
        log.warning("RESOURCE LIMITS ARE NOT ENFORCED: %s (running without cgroups)", why)
    from jobworker.cgroups.null import NullController  # noqa: PLC0415 (written by the engine)

    return NullController()
