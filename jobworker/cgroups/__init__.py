"""Resource control: cgroup v1 and v2 drivers behind one interface (see base.py).

``detect_controller(mode)`` picks the driver at server start.
"""

from __future__ import annotations

from jobworker.cgroups.base import JobCgroup, Limits, ResourceController, Usage
from jobworker.cgroups.detect import CgroupMode, CgroupsUnavailable, detect_controller
from jobworker.cgroups.v1 import V1Controller, V1JobCgroup
from jobworker.cgroups.v2 import V2Controller, V2JobCgroup

__all__ = [
    "CgroupMode",
    "CgroupsUnavailable",
    "JobCgroup",
    "Limits",
    "ResourceController",
    "Usage",
    "V1Controller",
    "V1JobCgroup",
    "V2Controller",
    "V2JobCgroup",
    "detect_controller",
]
