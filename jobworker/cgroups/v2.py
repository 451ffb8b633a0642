"""cgroup v2 driver: one cgroup per job at ``<own>/<root_name>/<job id>`` in the unified tree.

No-internal-processes rule: a cgroup that enables controllers for its children may hold no
processes itself (except the root). So ``setup()`` first moves every process of the server's
own cgroup into a leaf ``<own>/jobworker-server`` (the server, and anything else its service
manager put there), then enables the controllers in ``<own>/cgroup.subtree_control`` and
``<own>/<root_name>/cgroup.subtree_control``. A server restarted inside that leaf recognises
it and uses its parent as the own cgroup.

"No controllers" mode (``controllers=()``): placement, kill, freeze and populated tracking
work (they are core cgroup2 features), no limit is written. Used on hybrid hosts' controller-
less ``/sys/fs/cgroup/unified`` by the tests; it does not enforce anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

import trio

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import Limits, Usage
from jobworker.cgroups.controller import CgroupController
from jobworker.cgroups.inotify import FileWatch
from jobworker.cgroups.kill import ROUND_WAIT_S, kill_rounds, terminate_phase, wait_until
from jobworker.cgroups.layout import Hierarchy
from jobworker.errors import JobStartFailed, LimitRefused

log = logging.getLogger(__name__)

V2_CONTROLLERS = ("cpu", "io", "memory", "pids")  # the ones job limits use, in write order
SERVER_LEAF = "jobworker-server"
CPU_PERIOD_US = 100_000  # cpu.max "<quota> <period>"; quota = percent * 1000
MIB = 1024 * 1024
IO_UNLIMITED = "rbps=max wbps=max riops=max wiops=max"  # io.max with no limit left


class V2JobCgroup:
    """The unified-hierarchy cgroup of one job."""

    def __init__(self, job_id: str, directory: Path, controllers: frozenset[str]) -> None:
        self.job_id = job_id
        self.directory = directory
        self._controllers = controllers

    def procs_files(self) -> list[Path]:
        return [self.directory / "cgroup.procs"]

    def attach(self, pid: int) -> None:
        """Nothing to do: the launcher's child placed itself."""

    def pids(self) -> set[int]:
        return cgfs.pids_in([self.directory])

    def is_empty(self) -> bool:
        """``populated 0`` in cgroup.events (covers descendants; exited zombies do not count)."""
        events = cgfs.read_keyed(self.directory / "cgroup.events")
        if "populated" in events:
            return events["populated"] == 0
        return not self.pids()

    def oom_kills(self) -> int:
        if "memory" not in self._controllers:
            return 0
        return cgfs.read_keyed(self.directory / "memory.events").get("oom_kill", 0)

    async def wait_oom(self) -> None:
        """Return once memory.events shows oom_kill > 0; sleeps on inotify between changes.
        Cancellation closes the watch."""
        if "memory" not in self._controllers:
            await trio.sleep_forever()
        with FileWatch(self.directory / "memory.events") as watch:
            while self.oom_kills() == 0:
                await watch.wait()

    def usage(self) -> Usage:
        stat = cgfs.read_keyed(
            self.directory / "cpu.stat"
        )  # core file: present without controllers
        peak = cgfs.read_int(self.directory / "memory.peak")  # kernel >= 5.19
        io_text = cgfs.read_text(self.directory / "io.stat")  # with the io controller
        io = cgfs.parse_io_v2(io_text) if io_text is not None else None
        return Usage(
            cpu_time_s=stat["usage_usec"] / 1e6 if "usage_usec" in stat else None,
            peak_memory_bytes=peak,
            oom_kills=self.oom_kills(),
            io_read_bytes=None if io is None else io[0],
            io_write_bytes=None if io is None else io[1],
        )

    async def kill(self, grace: float) -> bool:
        """SIGTERM all, wait up to ``grace``, then lift the IO throttle and cgroup.kill until
        ``populated 0``. Bounded. True once the cgroup is empty."""
        if grace > 0 and await terminate_phase(self.pids, grace):
            return True
        await kill_rounds(self.pids, self._kill_round, f"job {self.job_id}")
        return await wait_until(self.is_empty, ROUND_WAIT_S)

    def lift_io_limits(self) -> None:
        """Set the job's ``io.max`` to unlimited on every device it limits.

        A process whose direct IO waits in the throttle cannot die until the kernel dispatches
        that IO: released, the IO completes and the kill lands at once.
        """
        path = self.directory / "io.max"
        for line in (cgfs.read_text(path) or "").splitlines():
            device = line.split(" ", 1)[0]
            if device and line.strip() != f"{device} {IO_UNLIMITED}":
                try:
                    cgfs.write_file(path, f"{device} {IO_UNLIMITED}")
                except OSError as exc:
                    log.warning("job %s: cannot lift io.max: %s", self.job_id, exc)

    async def _kill_round(self) -> None:
        self.lift_io_limits()
        try:
            cgfs.write_file(self.directory / "cgroup.kill", "1")  # kernel >= 5.14
            return
        except FileNotFoundError:
            return  # the cgroup is gone: nothing left to kill
        except PermissionError:
            pass  # no cgroup.kill (older kernel): freeze, SIGKILL, thaw
        freeze = self.directory / "cgroup.freeze"
        try:
            cgfs.write_file(freeze, "1")
            await wait_until(
                lambda: cgfs.read_keyed(self.directory / "cgroup.events").get("frozen", 1) == 1, 1.0
            )
        except OSError:
            pass
        cgfs.signal_pids(self.pids(), signal.SIGKILL)
        with contextlib.suppress(OSError):
            cgfs.write_file(freeze, "0")

    async def freeze(self, frozen: bool) -> None:
        """Freeze or thaw the job (cgroup.freeze), waiting until cgroup.events agrees."""
        cgfs.write_file(self.directory / "cgroup.freeze", "1" if frozen else "0")
        want = 1 if frozen else 0
        await wait_until(
            lambda: cgfs.read_keyed(self.directory / "cgroup.events").get("frozen") == want, 1.0
        )

    async def remove(self) -> None:
        """rmdir the job's cgroup (and any it made below), EBUSY retried, bounded. Idempotent."""
        await cgfs.remove_dirs([self.directory])


class V2Controller(CgroupController):
    """Creates job cgroups in the unified hierarchy under the server's own cgroup.

    ``controllers``: None = every one of cpu/io/memory/pids that ``<own>/cgroup.controllers``
    offers; an empty collection = "no controllers" mode (nothing enforced, see module doc).
    Call ``setup()`` once before ``create()``.
    """

    def __init__(
        self,
        hierarchy: Hierarchy,
        *,
        root_name: str = "jobworker",
        pids_max: int | None = None,
        controllers: Iterable[str] | None = None,
        io_devices: Sequence[str] | None = None,
    ) -> None:
        own = hierarchy.own_dir
        if own.name == SERVER_LEAF:  # restarted inside the leaf a previous run made
            own = own.parent
        self.own_dir = own
        self._is_tree_root = own == hierarchy.mount_point
        self.root_name = root_name
        self._pids_max = pids_max
        if controllers is None:
            offered = set((cgfs.read_text(own / "cgroup.controllers") or "").split())
            controllers = [c for c in V2_CONTROLLERS if c in offered]
        self.controllers = frozenset(controllers)
        self._io_devices = list(io_devices) if io_devices is not None else None

    @property
    def enforced(self) -> bool:
        return bool(self.controllers)

    @property
    def description(self) -> str:
        which = ", ".join(c for c in V2_CONTROLLERS if c in self.controllers) or "no controllers"
        return f"cgroup v2 ({which}); job cgroups under {self.root}"

    @property
    def root(self) -> Path:
        return self.own_dir / self.root_name

    def roots(self) -> list[Path]:
        return [self.root]

    def _enable_line(self) -> str:
        return " ".join(f"+{c}" for c in V2_CONTROLLERS if c in self.controllers)

    def setup(self) -> None:
        """Move our cgroup's processes into the server leaf, enable controllers down to
        ``<root_name>`` (OSError if the kernel refuses)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.controllers:
            return
        if not self._is_tree_root:
            leaf = self.own_dir / SERVER_LEAF
            leaf.mkdir(exist_ok=True)
            text = cgfs.read_text(self.own_dir / "cgroup.procs") or ""
            for pid in text.split():
                try:
                    cgfs.write_file(leaf / "cgroup.procs", pid)
                except ProcessLookupError:
                    continue  # exited meanwhile
        self._enable_controllers()

    def _enable_controllers(self) -> None:
        """Enable the controllers at every level from our own cgroup down to the root of the
        job cgroups (root_name may be nested: "jobworker/<instance>")."""
        if not self.controllers:
            return
        level = self.own_dir
        cgfs.write_file(level / "cgroup.subtree_control", self._enable_line())
        for part in Path(self.root_name).parts:
            level = level / part
            cgfs.write_file(level / "cgroup.subtree_control", self._enable_line())

    def create(self, job_id: str, limits: Limits) -> V2JobCgroup:
        """mkdir the job's cgroup and write its limits; on refusal remove it and raise
        LimitRefused naming the limit (JobStartFailed if the mkdir itself fails)."""
        directory = self.root / job_id
        try:
            if not self.root.is_dir():  # removed by another server's sweep while empty
                self.root.mkdir(parents=True, exist_ok=True)
                self._enable_controllers()
            directory.mkdir()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else "error"
            raise JobStartFailed(f"could not create the job's cgroup ({why})") from None
        try:
            self._write_limits(directory, limits)
        except BaseException:
            try:
                directory.rmdir()
            except OSError as exc:
                log.warning("job %s: cannot remove %s: %s", job_id, directory, exc.strerror)
            raise
        return V2JobCgroup(job_id, directory, self.controllers)

    def _write_limits(self, directory: Path, limits: Limits) -> None:
        if "cpu" in self.controllers:
            quota = limits.cpu_percent * CPU_PERIOD_US // 100
            cgfs.write_limit(directory / "cpu.max", f"{quota} {CPU_PERIOD_US}", "maxCPU")
        if "memory" in self.controllers:
            cgfs.write_limit(directory / "memory.max", str(limits.memory_mb * MIB), "maxMemory")
            swap = directory / "memory.swap.max"
            try:
                cgfs.write_file(swap, "0")
            except OSError as exc:
                # Absent without swap accounting (open fails EACCES): then there is no swap.
                if not (exc.errno == errno.EACCES and not swap.exists()):
                    cgfs.write_limit(swap, "0", "maxMemory")
            # v2 kills the whole cgroup on OOM (v1 kills only the largest process).
            cgfs.write_limit(directory / "memory.oom.group", "1", "maxMemory")
        if "pids" in self.controllers:
            pids_max = self._pids_max if self._pids_max is not None else limits.pids_max
            cgfs.write_limit(directory / "pids.max", str(pids_max), "pidsMax")
        if limits.io_bps > 0:
            if "io" not in self.controllers:
                raise LimitRefused("maxIOBPS: the io controller is not available on this host")
            for device in self.io_devices():
                n = limits.io_bps
                cgfs.write_limit(directory / "io.max", f"{device} rbps={n} wbps={n}", "maxIOBPS")

    def probe(self) -> None:
        """Prove the hierarchy is usable: mkdir + rmdir a probe cgroup (OSError if not)."""
        probe = self.root / f".probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()

    def _leftover(self, job_id: str) -> V2JobCgroup:
        return V2JobCgroup(job_id, self.root / job_id, self.controllers)
