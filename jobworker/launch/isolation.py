"""``--isolation auto|none|LIST``: which namespaces every job gets, and what this host allows.

``auto`` (the default) is pid, mount and cgroup wherever the host provides them; ``net`` is
opt-in (a job with its own network namespace has only a loopback interface). A namespace
listed explicitly that the host cannot provide refuses the start, as ``--cgroups require``
does. What the host provides is decided by a real launch at start (``probe_request``): the
kernel is the only judge of what it allows here (root, namespaces compiled in, a sandbox
around the server that forbids unshare or mount).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from jobworker.cgroups.layout import MOUNTINFO, parse_mountinfo
from jobworker.launch.launcher import Launcher
from jobworker.launch.request import Isolation, LaunchRequest

__all__ = [
    "AUTO",
    "CGROUP_ROOT",
    "IsolationSetting",
    "IsolationUnusable",
    "cgroup_mounts",
    "establish_isolation",
    "parse_isolation",
    "probe_request",
]

log = logging.getLogger("jobworker.launch")

AUTO = Isolation(pid=True, mount=True, cgroup=True)
NS_FILES = {"pid": "pid", "mount": "mnt", "cgroup": "cgroup", "net": "net"}
PROBE_COMMAND = "/bin/true"
PROBE_TIMEOUT_S = 30.0
CGROUP_ROOT = "/sys/fs/cgroup"
# Per-superblock options that are not a v1 hierarchy's controllers or name.
_NOT_CONTROLLERS = frozenset({"rw", "ro"})


class IsolationUnusable(ValueError):
    """An isolation setting that cannot be honoured here (one line: the start is refused)."""


@dataclass(frozen=True)
class IsolationSetting:
    wanted: Isolation
    explicit: bool  # listed by name (a failure refuses the start) rather than ``auto``


def parse_isolation(text: str) -> IsolationSetting:
    text = text.strip()
    if text == "auto":
        return IsolationSetting(AUTO, explicit=False)
    if text == "none":
        return IsolationSetting(Isolation(), explicit=True)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in Isolation.NAMES]
    if unknown or not names:
        raise IsolationUnusable(
            f"--isolation must be auto, none or a list of {', '.join(Isolation.NAMES)};"
            f" got {text!r}"
        )
    return IsolationSetting(Isolation(**dict.fromkeys(names, True)), explicit=True)


def host_allows(wanted: Isolation) -> tuple[Isolation, list[str]]:
    """What of ``wanted`` this host could provide before trying: (possible, why-not lines).
    Namespaces need root here (no user namespace is used)."""
    missing: list[str] = []
    allowed = {}
    for name in wanted.names:
        if os.geteuid() != 0:
            missing.append(f"{name}: the server is not root")
        elif not os.path.exists(f"/proc/self/ns/{NS_FILES[name]}"):
            missing.append(f"{name}: the kernel has no {name} namespaces")
        else:
            allowed[name] = True
    return Isolation(**allowed), missing


def probe_request(isolation: Isolation, work_dir: str) -> LaunchRequest:
    """A launch of /bin/true with ``isolation``, as a job would get it (no cgroups)."""
    return LaunchRequest(
        job_id="probe",
        argv=[PROBE_COMMAND],
        env={"PATH": "/usr/bin:/bin"},
        work_dir=work_dir,
        isolation=isolation,
    )


async def establish_isolation(
    launcher: Launcher, setting: IsolationSetting, work_dir: str
) -> Isolation:
    """The isolation every job will get: ``setting`` as far as this host provides it, tried
    for real with one launch. An explicit setting the host refuses raises
    IsolationUnusable; ``auto`` falls back (to none) with one WARNING."""
    possible, missing = host_allows(setting.wanted)
    if missing and setting.explicit:
        raise IsolationUnusable(f"--isolation {setting.wanted.describe()}: {'; '.join(missing)}")
    if missing:
        log.warning("jobs are not isolated from the host: %s", "; ".join(missing))
    if not possible.names:
        return possible
    # Shielded and bounded, as every spawn is: cut midway, a request would be half sent.
    with trio.move_on_after(PROBE_TIMEOUT_S, shield=True) as probe:
        try:
            process = await launcher.spawn(probe_request(possible, work_dir))
        except OSError as exc:
            why = exc.strerror or str(exc)
        else:
            await process.stdout.aclose()
            await process.wait()
            return possible
    if probe.cancelled_caught:
        why = f"an isolated start did not finish in {PROBE_TIMEOUT_S:.0f} s"
    if setting.explicit:
        raise IsolationUnusable(f"--isolation {possible.describe()}: {why}")
    log.warning("jobs are not isolated from the host: %s", why)
    return Isolation()


def cgroup_mounts(mountinfo: str | None = None) -> list[tuple[str, str, str]]:
    """The host's cgroup file systems under /sys/fs/cgroup as (mount point, fstype,
    options to mount it again with): a v1 hierarchy by its controllers (or ``none,name=``),
    cgroup2 as it is. Blocking (reads mountinfo): call it once, at start."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    found: list[tuple[str, str, str]] = []
    for mount in parse_mountinfo(text):
        if mount.fstype not in ("cgroup", "cgroup2"):
            continue
        if not (
            mount.mount_point == CGROUP_ROOT or mount.mount_point.startswith(CGROUP_ROOT + "/")
        ):
            continue
        if mount.fstype == "cgroup2":
            found.append((mount.mount_point, "cgroup2", ""))
            continue
        options = sorted(mount.super_options - _NOT_CONTROLLERS)
        if any(option.startswith("name=") for option in options):
            options = ["none", *options]
        found.append((mount.mount_point, "cgroup", ",".join(options)))
    return found
