"""cgroup v1 driver: one cgroup per job in each of cpu, cpuacct, memory, blkio, pids, freezer.

Job cgroups live at ``<own path>/<root_name>/<job id>`` in every hierarchy, where the own
path is this server's cgroup in that hierarchy (from /proc/self/cgroup). IO limits on v1
throttle only direct and synced IO: the kernel does not charge buffered writeback to a v1
cgroup, so a plain buffered ``dd`` is not slowed down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import Limits, Usage
from jobworker.cgroups.controller import CgroupController
from jobworker.cgroups.kill import kill_rounds, terminate_phase, wait_until
from jobworker.cgroups.layout import Hierarchy
from jobworker.errors import JobStartFailed

log = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000  # 100 ms: the kernel's default period; quota = percent * 1000
MIB = 1024 * 1024
FREEZE_TIMEOUT_S = 1.0  # a task in D state can keep a cgroup FREEZING; SIGKILL anyway after this
# After an eventfd wake, how long to watch for the oom_kill counter to rise (the notification
# comes before the kill is counted; a wake without a kill means the OOM resolved otherwise).
OOM_CONFIRM_S = 0.5
OOM_POLL_S = 0.1  # fallback when the eventfd cannot be registered: 500 jobs x 10 reads/s
# The throttle files a kill resets to unlimited ("MAJ:MIN 0"): the bps ones are the job's
# limits; the iops ones are never written by us, but lifting them too costs nothing.
THROTTLE_FILES = ("read_bps_device", "write_bps_device", "read_iops_device", "write_iops_device")


class V1JobCgroup:
    """The cgroups of one job in every v1 hierarchy (keyed by controller name)."""

    def __init__(self, job_id: str, dirs: Mapping[str, Path]) -> None:
        self.job_id = job_id
        self._dirs = dict(dirs)
        self._unique = list(dict.fromkeys(self._dirs.values()))
        self._oom_eventfd: int | None = None
        self._removed = False

    # -- placement ---------------------------------------------------------------------

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self._unique]

    def attach(self, pid: int) -> None:
        """Nothing to do: the launcher's child placed itself."""

    @property
    def paths(self) -> list[Path]:
        return list(self._unique)

    # -- state -------------------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every process in any of the job's cgroups (zombies are no longer listed)."""
        return cgfs.pids_in(self._unique)

    def is_empty(self) -> bool:
        return not self.pids()

    def oom_kills(self) -> int:
        memory = self._dirs.get("memory")
        if memory is None:
            return 0
        return cgfs.read_keyed(memory / "memory.oom_control").get("oom_kill", 0)

    def register_oom_eventfd(self) -> None:
        """Ask the kernel to signal an eventfd on OOM (cgroup.event_control + oom_control).

        On failure the watcher falls back to polling the counter.
        """
        memory = self._dirs.get("memory")
        if memory is None:
            return
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                cgfs.write_file(memory / "cgroup.event_control", f"{efd} {control}")
            finally:
                # The registration holds its own reference to the file.
                os.close(control)
        except OSError as exc:
            os.close(efd)
            log.warning("job %s: no OOM eventfd (%s); polling the counter", self.job_id, exc)
            return
        self._oom_eventfd = efd

    async def wait_oom(self) -> None:
        """Return once the OOM-kill counter is above 0.

        Sleeps on the eventfd (no CPU while idle); the eventfd also fires when the cgroup is
        removed, so every wake is confirmed with the counter. Cancellable at any point.
        """
        if "memory" not in self._dirs:
            await trio.sleep_forever()
        while self.oom_kills() == 0:
            efd = self._oom_eventfd
            if efd is None or self._removed:
                await trio.sleep(OOM_POLL_S)
                continue
            try:
                await trio.lowlevel.wait_readable(efd)
            except trio.ClosedResourceError:
                continue  # remove() closed it: the loop now polls (or the counter says OOM)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(efd)
            if self._removed or not self._dirs["memory"].exists():
                await trio.sleep_forever()
            # The kernel signals when the OOM starts and counts the kill a little later.
            await wait_until(lambda: self.oom_kills() > 0, OOM_CONFIRM_S)

    def usage(self) -> Usage:
        """CPU seconds (cpuacct.usage), peak memory (memory.max_usage_in_bytes), OOM kills,
        block IO (blkio.throttle.io_service_bytes)."""
        cpuacct, memory = self._dirs.get("cpuacct"), self._dirs.get("memory")
        cpu_ns = cgfs.read_int(cpuacct / "cpuacct.usage") if cpuacct else None
        peak = cgfs.read_int(memory / "memory.max_usage_in_bytes") if memory else None
        blkio = self._dirs.get("blkio")
        io_text = cgfs.read_text(blkio / "blkio.throttle.io_service_bytes") if blkio else None
        io = cgfs.parse_io_v1(io_text) if io_text is not None else None
        return Usage(
            cpu_time_s=None if cpu_ns is None else cpu_ns / 1e9,
            peak_memory_bytes=peak,
            oom_kills=self.oom_kills(),
            io_read_bytes=None if io is None else io[0],
            io_write_bytes=None if io is None else io[1],
        )

    # -- ending ------------------------------------------------------------------------

    async def kill(self, grace: float) -> bool:
        """SIGTERM all, wait up to ``grace`` (early return when empty), then lift the IO
        throttle and freeze -> SIGKILL all -> thaw until empty. Bounded; logs survivors, never
        raises for gone processes. True once the job's cgroups are empty."""
        if grace > 0 and await terminate_phase(self.pids, grace):
            return True
        return await kill_rounds(self.pids, self._kill_round, f"job {self.job_id}")

    def lift_io_limits(self) -> None:
        """Set every IO throttle of the job to unlimited (``MAJ:MIN 0``).

        A process whose direct IO waits in the throttle sits in uninterruptible sleep and
        cannot die (nor freeze) until the kernel dispatches that IO, which at a low limit
        takes as long as the limit makes it: released, the IO completes and the kill lands.
        """
        blkio = self._dirs.get("blkio")
        if blkio is None:
            return
        for name in THROTTLE_FILES:
            path = blkio / f"blkio.throttle.{name}"
            for line in (cgfs.read_text(path) or "").splitlines():
                device, _, value = line.partition(" ")
                if value.strip() not in ("", "0"):
                    try:
                        cgfs.write_file(path, f"{device} 0")
                    except OSError as exc:
                        log.warning("job %s: cannot lift %s: %s", self.job_id, path.name, exc)

    async def _kill_round(self) -> None:
        self.lift_io_limits()
        freezer = self._dirs.get("freezer")
        frozen = False
        if freezer is not None:
            try:
                cgfs.write_file(freezer / "freezer.state", "FROZEN")
                frozen = True
            except OSError:
                pass
        if frozen and freezer is not None:
            state = freezer / "freezer.state"
            await wait_until(
                lambda: (cgfs.read_text(state) or "").strip() != "FREEZING", FREEZE_TIMEOUT_S
            )
        cgfs.signal_pids(self.pids(), signal.SIGKILL)
        if frozen and freezer is not None:
            with contextlib.suppress(OSError):
                cgfs.write_file(freezer / "freezer.state", "THAWED")

    async def remove(self) -> None:
        """Close the OOM eventfd and rmdir every cgroup (EBUSY retried, bounded). Idempotent."""
        if self._oom_eventfd is not None:
            efd, self._oom_eventfd = self._oom_eventfd, None
            trio.lowlevel.notify_closing(efd)
            os.close(efd)
        self._removed = True
        await cgfs.remove_dirs(self._unique)

    def close_eventfd_sync(self) -> None:
        """Release the eventfd outside Trio (after a failed create)."""
        if self._oom_eventfd is not None:
            os.close(self._oom_eventfd)
            self._oom_eventfd = None


class V1Controller(CgroupController):
    """Creates job cgroups under the server's own cgroup in each v1 hierarchy.

    ``hierarchies`` maps controller name -> Hierarchy (co-mounted controllers share one).
    ``pids_max`` (server-wide) overrides Limits.pids_max when given. ``io_devices`` overrides
    the devices IO limits apply to (default: whole disks behind writable mounts, computed
    once, lazily).
    """

    def __init__(
        self,
        hierarchies: Mapping[str, Hierarchy],
        *,
        root_name: str = "jobworker",
        pids_max: int | None = None,
        io_devices: Sequence[str] | None = None,
    ) -> None:
        self._hierarchies = dict(hierarchies)
        self.root_name = root_name
        self._pids_max = pids_max
        self._io_devices = list(io_devices) if io_devices is not None else None

    @property
    def enforced(self) -> bool:
        return True

    @property
    def hierarchies(self) -> dict[str, Hierarchy]:
        return dict(self._hierarchies)

    @property
    def description(self) -> str:
        where = ", ".join(sorted({str(p) for p in self.roots()}))
        return f"cgroup v1 ({', '.join(sorted(self._hierarchies))}); job cgroups under {where}"

    def roots(self) -> list[Path]:
        """``<own>/<root_name>`` in each hierarchy (deduplicated)."""
        return list(dict.fromkeys(h.own_dir / self.root_name for h in self._hierarchies.values()))

    def ensure_roots(self) -> None:
        for root in self.roots():
            # root_name may be nested ("jobworker/<instance>"): make the shared parent too.
            root.mkdir(parents=True, exist_ok=True)

    def _job_dirs(self, job_id: str) -> dict[str, Path]:
        return {name: h.own_dir / self.root_name / job_id for name, h in self._hierarchies.items()}

    def create(self, job_id: str, limits: Limits) -> V1JobCgroup:
        """mkdir the job's cgroups, write its limits, register the OOM eventfd.

        Raises LimitRefused (naming the limit) or JobStartFailed; nothing is left behind then.
        """
        dirs = self._job_dirs(job_id)
        made: list[Path] = []
        cgroup = V1JobCgroup(job_id, dirs)
        try:
            for directory in dict.fromkeys(dirs.values()):
                self._make_job_dir(directory)
                made.append(directory)
            self._write_limits(dirs, limits)
            cgroup.register_oom_eventfd()
        except BaseException as exc:
            cgroup.close_eventfd_sync()
            for directory in reversed(made):
                try:
                    directory.rmdir()
                except OSError as rm_exc:
                    log.warning("job %s: cannot remove %s: %s", job_id, directory, rm_exc)
            if isinstance(exc, OSError):
                why = os.strerror(exc.errno) if exc.errno else "error"
                raise JobStartFailed(f"could not create the job's cgroup ({why})") from None
            raise
        return cgroup

    def _write_limits(self, dirs: Mapping[str, Path], limits: Limits) -> None:
        if "cpu" in dirs:
            cpu = dirs["cpu"]
            cgfs.write_limit(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US), "maxCPU")
            quota = limits.cpu_percent * CFS_PERIOD_US // 100
            cgfs.write_limit(cpu / "cpu.cfs_quota_us", str(quota), "maxCPU")
        if "memory" in dirs:
            memory = dirs["memory"]
            limit = str(limits.memory_mb * MIB)
            # Order matters: memsw may never be below limit_in_bytes (EINVAL).
            cgfs.write_limit(memory / "memory.limit_in_bytes", limit, "maxMemory")
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # absent without swap accounting: then there is no swap to use
                cgfs.write_limit(memsw, limit, "maxMemory")
        if "pids" in dirs:
            pids_max = self._pids_max if self._pids_max is not None else limits.pids_max
            cgfs.write_limit(dirs["pids"] / "pids.max", str(pids_max), "pidsMax")
        if "blkio" in dirs and limits.io_bps > 0:
            blkio = dirs["blkio"]
            for device in self.io_devices():
                for name in ("read_bps_device", "write_bps_device"):
                    cgfs.write_limit(
                        blkio / f"blkio.throttle.{name}", f"{device} {limits.io_bps}", "maxIOBPS"
                    )

    def probe(self) -> None:
        """Prove the hierarchies are usable: mkdir + rmdir a probe cgroup in each (OSError)."""
        self.ensure_roots()
        for root in self.roots():
            probe = root / f".probe-{os.getpid()}"
            self._make_job_dir(probe)
            probe.rmdir()

    def _leftover(self, job_id: str) -> V1JobCgroup:
        return V1JobCgroup(job_id, {n: d for n, d in self._job_dirs(job_id).items() if d.is_dir()})
