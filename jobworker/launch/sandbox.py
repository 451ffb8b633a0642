"""The forked child's side of a launch: place, isolate, de-privilege, exec. Never returns.

Runs in a child the launcher has just forked (in a fresh PID namespace when the job gets
one), in this order, so that no process of the job ever runs outside what it must be in:

1. its own session, then every cgroup of the job (``0`` written to each ``cgroup.procs``:
   the writer itself);
2. new mount (with IPC) / cgroup / network namespaces (the cgroup namespace after the
   placement, so that its root is the job's own cgroup), then the job's view of the
   filesystem;
3. the job's uid and gid, no supplementary groups, no capabilities, no_new_privs, then
   the working directory the client asked for (entered as the job's user);
4. exec of the command. With a PID namespace the child is that namespace's PID 1, which the
   kernel shields from every signal it has no handler for (a ``sleep`` as PID 1 would
   ignore SIGTERM); so the child stays as a minimal init: it forks the command (which gets
   the stop signals itself), reaps orphans, and passes the command's exact wait status to
   the launcher before it exits (the kernel then kills whatever is left in the namespace).

A failure at any step is written to the error pipe (stage, errno, message) and the child
exits; the pipe is close-on-exec, so the launcher reads EOF once the command runs.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import signal
import struct

from jobworker.launch import syscalls

TYPE_CHECKING = False  # typing itself is not imported: the launcher stays small
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["ERROR_FD", "STATUS_FD", "run_child"]

# Where the child keeps its two pipes once stdio is set up (everything above is closed).
ERROR_FD = 3
STATUS_FD = 4
# A job that never exec'd exits with these (shell conventions for 126 and 127): the
# engine records them as its exit code.
EXIT_SETUP_FAILED = 125  # placement, isolation or the user switch failed
EXIT_CANNOT_EXECUTE = 126  # found but not runnable
EXIT_NOT_FOUND = 127
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
TMPFS_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV
MS_NOEXEC = 0x8
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | MS_NOEXEC
# statvfs's ST_NODEV and ST_NOEXEC have the values of MS_NODEV and MS_NOEXEC: a requested
# working directory made writable keeps what its host mount forbids.
KEPT_MOUNT_FLAGS = syscalls.MS_NODEV | MS_NOEXEC


class _Failed(Exception):
    def __init__(self, stage: str, code: int, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.stage, self.code, self.message, self.exit_code = stage, code, message, exit_code


def _report(fd: int, stage: str, code: int, message: str) -> None:
    data = f"{stage}\0{code}\0{message}".encode(errors="replace")
    try:
        os.write(fd, data)
    except OSError:
        pass  # the launcher is gone: nobody is left to tell


def run_child(request: dict[str, Any], output_fd: int, error_fd: int, status_fd: int) -> NoReturn:
    """Turn this freshly forked process into the job. Never returns."""
    report_fd = error_fd
    try:
        try:
            _restore_signals()
            os.setsid()
            _place(request)
            _isolate(request)
            _set_stdio(output_fd, error_fd, status_fd)
            report_fd = ERROR_FD
            _drop_privileges(request)
            if request["isolation"]["pid"]:
                _run_init(request)
            os.close(STATUS_FD)
            _exec(request)
        except _Failed as failed:
            _report(report_fd, *_fields(failed))
            os._exit(failed.exit_code)
    except BaseException as exc:
        _report(report_fd, "setup", 0, f"internal error: {type(exc).__name__}: {exc}")
        os._exit(EXIT_SETUP_FAILED)


def _fields(failed: _Failed) -> tuple[str, int, str]:
    return failed.stage, failed.code, failed.message


def _restore_signals() -> None:
    # The launcher ignores SIGPIPE (Python's default) and watches signals through a wakeup
    # fd: a job starts with every signal at its default, as from a shell.
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _place(request: dict[str, Any]) -> None:
    for procs in request["procs_files"]:
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")  # 0: the writing process itself
            finally:
                os.close(fd)
        except OSError as exc:
            raise _Failed(
                "place", exc.errno or 0, "could not place the job in its cgroup", EXIT_SETUP_FAILED
            ) from None


def _isolate(request: dict[str, Any]) -> None:
    iso = request["isolation"]
    flags = (
        # With its own mount namespace a job gets its own IPC namespace too: SysV and POSIX
        # shared memory, semaphores and message queues that no other job shares, and that
        # end with it.
        (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWIPC if iso["mount"] else 0)
        | (syscalls.CLONE_NEWCGROUP if iso["cgroup"] else 0)
        | (syscalls.CLONE_NEWNET if iso["net"] else 0)
    )
    try:
        if flags:
            syscalls.unshare(flags)
        if iso["net"]:
            _loopback_up()
        if iso["mount"]:
            _build_view(request)
    except OSError as exc:
        raise _Failed(
            "isolate",
            exc.errno or 0,
            f"could not isolate the job: {exc.strerror}",
            EXIT_SETUP_FAILED,
        ) from None


def _loopback_up() -> None:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        sock.close()


def _build_view(request: dict[str, Any]) -> None:
    """The job's filesystem: the host read-only, the server's paths hidden, its work dir
    writable at the same path, a requested working directory (other than ``/``) too, a
    private /tmp and /dev/shm, and (with its own PID namespace) a /proc that shows only its
    own processes."""
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    work = os.open(request["work_dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # The host's directory, opened before /tmp and the hidden paths are covered: it may lie
    # under the private /tmp. "/" stays read-only (a mount over the root is not seen).
    cwd = request.get("cwd") or ""
    cwd_fd = -1
    if cwd and cwd not in ("/", request["work_dir"]):
        cwd_fd = os.open(cwd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    syscalls.rdonly_recursive("/")
    for private in ("/tmp", "/dev/shm"):
        if os.path.isdir(private):
            syscalls.mount("tmpfs", private, "tmpfs", TMPFS_FLAGS, "mode=1777")
    # Hidden paths still visible (not already under a private tmpfs) are covered by an
    # empty tmpfs, made read-only once the work dir's mount point exists in it.
    covers = []
    for hidden in request["hidden"]:
        if os.path.isdir(hidden):
            syscalls.mount("tmpfs", hidden, "tmpfs", TMPFS_FLAGS, "size=64k,mode=0755")
            covers.append(hidden)
    # The work dir, writable at its own path (through the host's /proc: the job's own is
    # mounted last). Its path may now lie in a fresh tmpfs: made there first.
    os.makedirs(request["work_dir"], mode=0o755, exist_ok=True)
    syscalls.mount(f"/proc/self/fd/{work}", request["work_dir"], None, syscalls.MS_BIND)
    os.close(work)
    # A bind copies its source mount's flags, read-only included: made writable again.
    syscalls.mount(
        "none", request["work_dir"], None, syscalls.MS_REMOUNT | syscalls.MS_BIND | TMPFS_FLAGS
    )
    if cwd_fd >= 0:
        _bind_writable(cwd_fd, cwd)
    for cover in covers:
        syscalls.mount(
            "none",
            cover,
            None,
            syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | TMPFS_FLAGS,
        )
    if os.path.isdir("/dev/pts"):
        # Its own pseudo-terminals: opening /dev/ptmx allocates from this instance, not from
        # the host's (whose count a job could exhaust).
        syscalls.mount(
            "devpts",
            "/dev/pts",
            "devpts",
            syscalls.MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620",
        )
    if request["isolation"]["cgroup"]:
        _cgroup_view(request["cgroup_mounts"])
    if request["isolation"]["pid"]:
        syscalls.mount("proc", "/proc", "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | MS_NOEXEC)


def _bind_writable(fd: int, path: str) -> None:
    """Bind the host directory ``fd`` at ``path``, writable (as far as its permissions let
    the job's user), with what lies below it as the job sees it: recursive, taken once the
    hidden paths are covered, so that their covers come along. Setuid bits stay inert."""
    kept = os.fstatvfs(fd).f_flag & KEPT_MOUNT_FLAGS
    os.makedirs(path, mode=0o755, exist_ok=True)  # it may now lie in the private /tmp
    syscalls.mount(f"/proc/self/fd/{fd}", path, None, syscalls.MS_BIND | syscalls.MS_REC)
    os.close(fd)
    # Only the top mount is made writable: those below keep the view's read-only flag.
    syscalls.mount(
        "none", path, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NOSUID | kept
    )


def _cgroup_view(mounts: list[tuple[str, str, str]]) -> None:
    """/sys/fs/cgroup as the job's cgroup namespace shows it: every hierarchy mounted afresh
    (rooted at the job's own cgroup), read-only, over an empty tmpfs that hides the host's
    view. A hierarchy the kernel will not mount again is left out, not fatal."""
    if not mounts:
        return
    cover = all(point != CGROUP_ROOT for point, _, _ in mounts)
    if cover:
        syscalls.mount("tmpfs", CGROUP_ROOT, "tmpfs", TMPFS_FLAGS, "size=64k,mode=0755")
    for point, fstype, options in mounts:
        try:
            os.makedirs(point, mode=0o755, exist_ok=True)
            syscalls.mount(fstype, point, fstype, CGROUP_FLAGS, options)
        except OSError:
            continue
    if cover:
        syscalls.mount(
            "none",
            CGROUP_ROOT,
            None,
            syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | TMPFS_FLAGS,
        )


def _set_stdio(output_fd: int, error_fd: int, status_fd: int) -> None:
    # Park the pipes above stdio first: they may themselves be 0, 1 or 2.
    parked = [os.dup(fd) for fd in (output_fd, error_fd, status_fd)]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(parked[0], 1)
    os.dup2(parked[0], 2)
    os.dup2(parked[1], ERROR_FD, inheritable=False)
    os.dup2(parked[2], STATUS_FD, inheritable=False)
    os.closerange(STATUS_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _drop_privileges(request: dict[str, Any]) -> None:
    try:
        os.chdir(request["work_dir"])
    except OSError as exc:
        raise _Failed(
            "setup", exc.errno or 0, f"cannot enter the work dir: {exc.strerror}", EXIT_SETUP_FAILED
        ) from None
    if request["uid"] is not None and request["gid"] is not None:
        try:
            os.setgroups([])
            os.setresgid(request["gid"], request["gid"], request["gid"])
            os.setresuid(request["uid"], request["uid"], request["uid"])
            syscalls.no_new_privs()
        except OSError as exc:
            raise _Failed(
                "user",
                exc.errno or 0,
                f"cannot switch to the job user: {exc.strerror}",
                EXIT_SETUP_FAILED,
            ) from None
    if request.get("cwd"):
        # As the job's user: the kernel checks that it may enter it (the server did too).
        try:
            os.chdir(request["cwd"])
        except OSError as exc:
            raise _Failed(
                "setup",
                exc.errno or 0,
                f"cannot enter the working directory: {exc.strerror}",
                EXIT_SETUP_FAILED,
            ) from None


def _exec(request: dict[str, Any]) -> NoReturn:
    try:
        os.execve(request["argv"][0], request["argv"], request["env"])
    except OSError as exc:
        code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        raise _Failed("exec", exc.errno or 0, exc.strerror or str(exc), code) from None


def _run_init(request: dict[str, Any]) -> NoReturn:
    """PID 1 of the job's namespace: fork the command, reap, pass on the command's wait
    status. The command's own exec failure reaches the launcher directly.

    No signal is forwarded: every stop signals each process of the job itself (through the
    cgroup, or the process group without cgroups), the command included, so a forwarded
    copy would reach it twice. The kernel drops the init's copy (no handler), and SIGKILL
    still ends the init and with it the namespace."""
    command = os.fork()
    if command == 0:
        os.close(STATUS_FD)
        try:
            _exec(request)
        except _Failed as failed:
            _report(ERROR_FD, *_fields(failed))
            os._exit(failed.exit_code)
    os.close(ERROR_FD)  # EOF for the launcher once the command has exec'd
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(EXIT_SETUP_FAILED)  # cannot happen: the command is our child
        if pid == command:
            try:
                os.write(STATUS_FD, struct.pack("=i", status))
            except OSError:
                pass
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
