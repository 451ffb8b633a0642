"""The server's side of the launcher: start it, ask it for job processes, hear their exits.

``Launcher.run`` is a long-lived task of the nursery that owns the jobs' infrastructure (the
server's root nursery, or the job manager's when the engine runs on its own). It starts the
launcher process (``jobworker.launch.process``) and restarts it if it dies: the jobs it held
are then reported lost (their processes are killed through their cgroups by their own
cleanup, and recorded FAILED), and new jobs start again through the new launcher.
"""

from __future__ import annotations

import array
import contextlib
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import jobworker
from jobworker.launch.process import HEADER
from jobworker.launch.request import LaunchRequest

if TYPE_CHECKING:
    from jobworker.launch.reaper import Reaper

__all__ = ["LaunchFailed", "LaunchedProcess", "Launcher", "LauncherGone", "open_launcher"]

log = logging.getLogger("jobworker.launch")

READY_TIMEOUT_S = 10.0  # a fresh Python importing a few modules: ~50 ms; this is a failure
EXIT_WAIT_S = 2.0  # the launcher exits at EOF at once; past this it is killed
SPAWN_WAIT_S = 10.0  # waiting for a launcher being restarted before a spawn gives up
SPAWN_REPLY_S = 30.0  # a spawn normally answers in milliseconds; a stuck kernel call
RESTART_BACKOFF_S = (0.0, 0.1, 0.5, 1.0)  # a launcher that dies at once is not re-spawned hot


# The launcher's entry, for an interpreter started without site: our package's parent
# directory is put on sys.path by hand (it may be site-packages, or a source tree).
LAUNCHER_MAIN = (
    f"import sys; sys.path.insert(0, {str(Path(jobworker.__file__).resolve().parent.parent)!r}); "
    "from jobworker.launch.process import main; sys.exit(main(sys.argv))"
)


class LauncherGone(OSError):
    """The launcher died (or could not be started); the spawn did not happen."""


class LaunchFailed(OSError):
    """The job's process could not be started; ``stage`` says where (place, isolate, user,
    exec) and ``errno``/``strerror`` why."""

    def __init__(self, code: int, message: str, stage: str) -> None:
        super().__init__(code, message)
        self.stage = stage


class LaunchedProcess:
    """A job's main process as the launcher reports it (the shape of trio.Process that the
    engine uses): ``pid``, ``stdout``, ``returncode``, ``wait()``, ``poll()``, ``kill()``.

    ``returncode`` follows subprocess: negative for a signal. ``lost`` is True when the
    launcher died before the process's exit was seen (``returncode`` stays None).
    """

    def __init__(self, pid: int, stdout: trio.lowlevel.FdStream) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self.lost = False
        self._exited = trio.Event()

    def _set_exit(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set()

    def _set_lost(self) -> None:
        self.lost = True
        self._exited.set()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if not self._exited.is_set():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


@dataclass
class _Spawn:
    read_fd: int
    done: trio.Event = field(default_factory=trio.Event)
    process: LaunchedProcess | None = None
    error: OSError | None = None


class Launcher:
    """Owns the launcher process; ``spawn()`` starts one job's process through it."""

    def __init__(self, *, reaper: Reaper | None = None) -> None:
        self._reaper = reaper
        self._sock: trio.socket.SocketType | None = None
        self._up = trio.Event()  # set while a launcher is ready to take requests
        self._send_lock = trio.Lock()
        self._spawns: dict[str, _Spawn] = {}
        self._processes: dict[int, LaunchedProcess] = {}
        self.pid: int | None = None  # the launcher process's, while it runs
        self.restarts = 0
        self._scope = trio.CancelScope(shield=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the launcher until ``close()``, restarting it if it dies. ``started()`` fires
        once the first one is ready; failing to start that one raises LauncherGone.

        Shielded from the owner's cancellation: the jobs' cleanup after a cancellation still
        needs their exit reports, so the owner calls ``close()`` once every job has ended."""
        with self._scope:
            await self._run(task_status)

    def close(self) -> None:
        """End ``run()``: the launcher process is told to exit (it holds no job by now)."""
        self._scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        failures = 0
        first = True
        while True:
            try:
                await self._run_one(task_status if first else trio.TASK_STATUS_IGNORED)
            except LauncherGone:
                if first:
                    raise
                failures += 1
            else:
                failures = 0
            first = False
            self.restarts += 1
            await trio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])

    async def _run_one(self, task_status: trio.TaskStatus[None]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                sys.executable,
                "-S",  # no site: a fork costs in proportion to the launcher's memory
                "-I",
                "-c",
                LAUNCHER_MAIN,
                str(theirs.fileno()),
            ]
            with self._reaper.spawning() if self._reaper else nullcontext():
                process = await trio.lowlevel.open_process(
                    argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
                )
                if self._reaper:
                    self._reaper.protect(process.pid)
        except OSError as exc:
            ours.close()
            raise LauncherGone(exc.errno or 0, f"cannot start the launcher: {exc}") from None
        finally:
            theirs.close()
        sock = trio.socket.from_stdlib_socket(ours)
        try:
            ready = None
            with trio.move_on_after(READY_TIMEOUT_S):
                ready = await _read_frame(sock)
            if not ready or ready.get("op") != "ready":
                raise LauncherGone(0, "the launcher did not start")
            self.pid = process.pid
            self._sock = sock
            self._up.set()
            log.debug("launcher started: pid %d", process.pid)
            task_status.started()
            # ECONNRESET when it died with a request unread: a death all the same.
            with contextlib.suppress(OSError):
                await self._read_replies(sock)
            log.error(
                "the launcher (pid %d) died: %s; restarting it",
                process.pid,
                _describe_exit(await _wait_briefly(process)),
            )
        finally:
            self._up = trio.Event()
            self._sock = None
            self.pid = None
            self._abandon()
            sock.close()
            with trio.CancelScope(shield=True):
                await _wait_briefly(process)
                if self._reaper:
                    self._reaper.release(process.pid)

    def _abandon(self) -> None:
        """The launcher is gone: its pending spawns fail, its processes are lost."""
        for spawn in self._spawns.values():
            if not spawn.done.is_set():
                os.close(spawn.read_fd)
                spawn.error = LauncherGone(0, "the launcher died")
                spawn.done.set()
        self._spawns.clear()
        for process in self._processes.values():
            process._set_lost()
        self._processes.clear()

    async def _read_replies(self, sock: trio.socket.SocketType) -> None:
        while (message := await _read_frame(sock)) is not None:
            op = message.get("op")
            if op == "spawned":
                pid = int(message["pid"])
                spawn = self._spawns.pop(str(message["job"]), None)
                if spawn is None:
                    # Given up on (no answer in time): nobody supervises it, so it goes.
                    log.error("job %s started after its start was given up: killed", message["job"])
                    _kill_group(pid)
                    continue
                process = LaunchedProcess(pid, trio.lowlevel.FdStream(spawn.read_fd))
                self._processes[pid] = process
                spawn.process = process
                spawn.done.set()
            elif op in ("failed", "error"):
                spawn = self._spawns.pop(str(message.get("job")), None)
                if spawn is None:
                    log.error("launcher: %s", message.get("message"))
                    continue
                os.close(spawn.read_fd)
                spawn.error = LaunchFailed(
                    int(message.get("errno", 0)),
                    str(message["message"]),
                    str(message.get("stage", "setup")),
                )
                spawn.done.set()
            elif op == "exited":
                exited = self._processes.pop(int(message["pid"]), None)
                if exited is not None:
                    exited._set_exit(int(message["status"]))
            else:
                log.error("launcher: unexpected reply %r", op)

    async def spawn(self, request: LaunchRequest) -> LaunchedProcess:
        """Start the job's process; return once its command has exec'd (placed, isolated,
        de-privileged). Raises LaunchFailed (the child's report) or LauncherGone. Shield it:
        cancelled midway, the process may start with nobody to supervise it."""
        with trio.move_on_after(SPAWN_WAIT_S):
            await self._up.wait()
        sock = self._sock
        if sock is None:
            raise LauncherGone(0, "the launcher is not running")
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        spawn = _Spawn(read_fd)
        self._spawns[request.job_id] = spawn
        payload = marshal.dumps({"op": "spawn", "request": request.to_wire()})
        try:
            async with self._send_lock:
                fds = array.array("i", [write_fd])
                await sock.sendmsg(
                    [HEADER.pack(len(payload))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                )
                view = memoryview(payload)
                while view:
                    sent = await sock.send(view)
                    view = view[sent:]
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            if self._spawns.pop(request.job_id, None) is not None:
                os.close(read_fd)
            raise LauncherGone(0, "the launcher died") from None
        finally:
            os.close(write_fd)
        with trio.move_on_after(SPAWN_REPLY_S):
            await spawn.done.wait()
        if not spawn.done.is_set():
            # A child stuck in the kernel (a cgroup write, a hung file system): the job is
            # given up on now, and killed should it start after all.
            if self._spawns.pop(request.job_id, None) is not None:
                os.close(read_fd)
            raise LauncherGone(0, f"the launcher did not start the job in {SPAWN_REPLY_S:.0f} s")
        if spawn.error is not None:
            raise spawn.error
        assert spawn.process is not None
        return spawn.process


@asynccontextmanager
async def open_launcher(
    nursery: trio.Nursery, *, reaper: Reaper | None = None
) -> AsyncIterator[Launcher]:
    """A running launcher owned by ``nursery``, closed when the block is left (however)."""
    launcher = Launcher(reaper=reaper)
    await nursery.start(launcher.run)
    try:
        yield launcher
    finally:
        launcher.close()


def _kill_group(pid: int) -> None:
    """SIGKILL a job's process group (its pid leads it; with a PID namespace, killing its
    init ends the whole namespace)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


async def _read_exactly(sock: trio.socket.SocketType, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def _read_frame(sock: trio.socket.SocketType) -> dict[str, Any] | None:
    header = await _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    payload = await _read_exactly(sock, HEADER.unpack(header)[0])
    if payload is None:
        return None
    message = marshal.loads(payload)  # noqa: S302 (our own launcher, over a socket pair)
    assert isinstance(message, dict)
    return message


async def _wait_briefly(process: trio.Process) -> int | None:
    with trio.move_on_after(EXIT_WAIT_S):
        return await process.wait()
    process.kill()
    return await process.wait()


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
