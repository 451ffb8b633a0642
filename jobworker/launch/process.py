"""The launcher process: a warm, single-threaded Python that forks every job.

Started once by the server (``launcher.LAUNCHER_MAIN``, under ``python -S -I``) and talked
to over a Unix stream socket: the server sends spawn requests (a marshal'd frame, the job's
output pipe beside it as SCM_RIGHTS); the launcher forks, the child places and isolates
itself (``sandbox.run_child``), and the launcher answers ``spawned`` once the command has
exec'd (the child's close-on-exec error pipe reached EOF) or ``failed`` with what the child
reported. It is the parent of every job, so it also reports each job's exit status, and as a
child subreaper it reaps the orphans a job leaves (without its own PID namespace a job's
double-forked processes reparent here).

It forks from a process with no threads and no event loop, so the fork is safe; and it is
kept small, because a fork costs in proportion to the parent's memory (page tables, and a
copy-on-write fault for every page either side writes next). It runs without ``site``
(``python -S``) and imports only built-in modules and ctypes: no json, dataclasses,
selectors or socket wrappers. Frames are marshal'd dicts of plain values (both ends are this
package). When the server closes the socket, or dies (parent-death signal), the launcher
exits.
"""

from __future__ import annotations

import _socket
import gc
import marshal
import os
import select
import signal
import struct
import sys

from jobworker.launch import sandbox, syscalls

TYPE_CHECKING = False  # typing itself is not imported: the launcher stays small
if TYPE_CHECKING:
    from typing import Any

__all__ = ["HEADER", "MAX_FDS", "main", "read_frame", "write_frame"]

HEADER = struct.Struct("!I")  # length of the JSON payload that follows
MAX_FDS = 1  # a request carries the job's output pipe
MAX_FRAME = 64 * 1024 * 1024  # far above ARG_MAX: only a corrupt stream gets near it
FAST_EXEC_WAIT_S = 0.05
EXIT_PIDNS_STUCK = 70  # the launcher could not leave a job's PID namespace


def write_frame(sock: _socket.socket, message: dict[str, Any]) -> None:
    payload = marshal.dumps(message)
    sock.sendall(HEADER.pack(len(payload)) + payload)


def read_frame(sock: _socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One frame and the fds sent with its header; None at EOF."""
    fds: list[int] = []
    header, ancillary, _flags, _addr = sock.recvmsg(
        HEADER.size, _socket.CMSG_SPACE(MAX_FDS * 4), _socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4]))
    if not header:
        return None
    while len(header) < HEADER.size:
        more = sock.recv(HEADER.size - len(header))
        if not more:
            return None
        header += more
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError("frame too large")
    payload = bytearray()
    while len(payload) < length:
        chunk = sock.recv(min(length - len(payload), 1 << 20))
        if not chunk:
            return None
        payload += chunk
    message = marshal.loads(payload)
    if not isinstance(message, dict):
        raise TypeError("not a message")
    return message, fds


class _Pending:
    """A child forked for a job whose command has not exec'd yet."""

    __slots__ = ("error", "exit_status", "job_id", "pid", "status_fd", "watched")

    def __init__(self, job_id: str, pid: int, status_fd: int) -> None:
        self.job_id = job_id
        self.pid = pid
        self.error = bytearray()
        self.status_fd = status_fd
        self.exit_status: int | None = None  # reaped before its error pipe reached EOF
        self.watched = False  # its error pipe is in the epoll set


class Launcher:
    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._epoll = select.epoll()
        self._own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._pending: dict[int, _Pending] = {}  # error pipe fd -> pending spawn
        self._pending_pids: dict[int, _Pending] = {}
        self._running: dict[int, int] = {}  # pid -> its status pipe fd
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self._epoll.register(self._sock.fileno(), select.EPOLLIN)
        self._epoll.register(self._wakeup_r, select.EPOLLIN)

    def serve(self) -> None:
        while True:
            for fd, _events in self._epoll.poll():
                if fd == self._sock.fileno():
                    if not self._handle_request():
                        return
                elif fd == self._wakeup_r:
                    while True:
                        try:
                            if not os.read(self._wakeup_r, 512):
                                break
                        except BlockingIOError:
                            break
                    self._reap()
                else:
                    self._read_error_pipe(fd)

    def _handle_request(self) -> bool:
        frame = read_frame(self._sock)
        if frame is None:
            return False
        message, fds = frame
        if message.get("op") != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            request = message.get("request")
            job = request.get("job_id") if isinstance(request, dict) else None
            write_frame(self._sock, {"op": "error", "job": job, "message": "bad request"})
            return True
        self._spawn(message["request"], fds[0])
        return True

    def _spawn(self, request: dict[str, Any], output_fd: int) -> None:
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid = -1
        try:
            if request["isolation"]["pid"]:
                syscalls.unshare(syscalls.CLONE_NEWPID)
            try:
                pid = os.fork()
            finally:
                if request["isolation"]["pid"] and pid != 0:
                    self._leave_pid_namespace(pid)
        except OSError as exc:
            for fd in (error_r, error_w, status_r, status_w, output_fd):
                os.close(fd)
            write_frame(
                self._sock,
                {
                    "op": "failed",
                    "job": request["job_id"],
                    "stage": "isolate",
                    "errno": exc.errno or 0,
                    "message": f"could not isolate the job: {exc.strerror}",
                },
            )
            return
        if pid == 0:
            # Nothing of the launcher stays open in the job: with its socket held by a child
            # that is slow to exec, the server would not see the launcher's death.
            signal.set_wakeup_fd(-1)
            for fd in (error_r, status_r, self._sock.fileno(), self._epoll.fileno(),
                       self._wakeup_r, self._wakeup_w, self._own_pidns):  # fmt: skip
                os.close(fd)
            for fd in self._pending:
                os.close(fd)
            sandbox.run_child(request, output_fd, error_w, status_w)
        os.close(error_w)
        # Until the child execs, every page either process writes is copied: the launcher
        # waits for the exec doing as little as it can (usually about a millisecond). A
        # child slow to get there (a kernel stalling its cgroup write) is waited for in
        # the loop instead, so that other spawns and exit reports are not held up.
        poller = select.poll()  # not select(): the launcher's fds may be above 1023
        poller.register(error_r, select.POLLIN)
        poller.poll(FAST_EXEC_WAIT_S * 1000)
        os.close(status_w)
        os.close(output_fd)
        pending = _Pending(request["job_id"], pid, status_r)
        self._pending[error_r] = pending
        self._pending_pids[pid] = pending
        os.set_blocking(error_r, False)
        if not self._read_error_pipe(error_r):
            self._epoll.register(error_r, select.EPOLLIN)
            pending.watched = True

    def _leave_pid_namespace(self, child: int) -> None:
        """Back to the launcher's own PID namespace for the next children. Should the kernel
        refuse, every later job would share this one's namespace: the child is killed and
        the launcher exits, so that the server starts a fresh one."""
        try:
            syscalls.setns(self._own_pidns, syscalls.CLONE_NEWPID)
        except OSError:
            if child > 0:
                os.kill(child, signal.SIGKILL)
            os._exit(EXIT_PIDNS_STUCK)

    def _read_error_pipe(self, fd: int) -> bool:
        """Read what the child reported; True once its pipe reached EOF and the spawn was
        answered."""
        pending = self._pending[fd]
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return False
            if not data:
                break
            pending.error += data
        if pending.watched:
            self._epoll.unregister(fd)
        os.close(fd)
        del self._pending[fd]
        del self._pending_pids[pending.pid]
        if pending.error:
            stage, code, message = bytes(pending.error).decode(errors="replace").split("\0", 2)
            os.close(pending.status_fd)
            if pending.exit_status is None:
                # It is exiting right after its report: wait for it here, or its exit
                # would be reported for a job that never started.
                os.waitpid(pending.pid, 0)
            write_frame(
                self._sock,
                {
                    "op": "failed",
                    "job": pending.job_id,
                    "stage": stage,
                    "errno": int(code or 0),
                    "message": message,
                },
            )
            return True
        write_frame(self._sock, {"op": "spawned", "job": pending.job_id, "pid": pending.pid})
        if pending.exit_status is None:
            self._running[pending.pid] = pending.status_fd
        else:
            self._report_exit(pending.pid, pending.exit_status, pending.status_fd)
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._running:
                self._report_exit(pid, status, self._running.pop(pid))
            elif pid in self._pending_pids:
                self._pending_pids[pid].exit_status = status
            # else: an orphan a job left behind; reaped, nothing to report

    def _report_exit(self, pid: int, status: int, status_fd: int) -> None:
        # With a PID namespace the pid is the job's init: the command's own status came
        # through the status pipe just before the init exited.
        os.set_blocking(status_fd, False)
        try:
            data = os.read(status_fd, 4)
        except OSError:
            data = b""
        os.close(status_fd)
        if len(data) == 4:
            (status,) = struct.unpack("=i", data)
        write_frame(self._sock, {"op": "exited", "pid": pid, "status": status})


def main(argv: list[str]) -> int:
    sock = _socket.socket(fileno=int(argv[1]))
    os.set_inheritable(sock.fileno(), False)
    # No parent-death signal: the kernel ties it to the thread that forked us (a worker
    # thread of the server's, which exits when idle). The launcher ends at EOF on its socket
    # instead, which the server's death closes.
    syscalls.set_child_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl+C is the server's to handle
    launcher = Launcher(sock)
    write_frame(sock, {"op": "ready", "pid": os.getpid()})
    # Every object so far survives for the launcher's life: keep the collector off them,
    # so that a forked child's pages stay shared with the launcher.
    gc.freeze()
    launcher.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
