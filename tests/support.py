"""Helpers shared by test modules (importable as ``tests.support``; conftest files are not)."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker import pki
from jobworker.api import worker_pb2

if TYPE_CHECKING:
    from jobworker.cgroups.base import JobCgroup

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class TestPKI:
    """A certs dir laid out as scripts/gen-certs writes it, plus odd certificates for attacks.

    ``dir`` holds ca-cert.pem, server-*.pem, admin-client-*, viewer-client-*,
    client-* (admin). Extra pairs, all as <stem>-cert.pem / <stem>-key.pem in
    ``dir``: ``noou-client`` (no OU), ``guest-client`` (OU=guest), ``alice-client``
    (CN alice, OU=admin: a second admin),
    ``expired-client`` (expired yesterday), ``foreign-client`` (signed by
    another CA, OU=admin).
    """

    dir: Path
    ca: pki.Authority

    def cert(self, stem: str) -> Path:
        return self.dir / f"{stem}-cert.pem"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}-key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca-cert.pem"


def skip_unless(condition: bool, reason: str) -> None:
    """Skip a test whose precondition does not hold here; in CI, fail instead.

    CI runs as root on a cgroup v1 machine: a test that needs root or cgroups must run there.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


# The Python that job commands run: a job runs as an unprivileged uid of its own, which may
# not execute this interpreter when it lives under a private home (pyenv's under /root);
# the system's can. Job scripts use the standard library only.
JOB_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


# A full data disk, for real: a small tmpfs the test mounts (as root) and fills.


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "20m") -> Iterator[Path]:
    """``path`` (made if missing) as a tmpfs of ``size`` for the block, unmounted afterwards."""
    skip_unless(os.geteuid() == 0, "mounting a tmpfs needs root")
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the disk is full (keeps what fitted)."""
    block = b"\0" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0"):  # the last partial page
                pass
    finally:
        os.close(fd)


def fill_completely(data: Path) -> list[Path]:
    """Fill the disk of data dir ``data``, the server's reserve included (as if something else
    had used it); return the fillers."""
    fill(data / "filler1")
    (data / ".reserve").unlink(missing_ok=True)
    fill(data / "filler2")
    return [data / "filler1", data / "filler2"]


# /proc inspection: one parser for every test ("pid (comm) S ppid ...": comm may hold spaces and
# parentheses, so fields are split after the last ')').


def _stat_fields(pid: int | str) -> list[bytes] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def proc_state(pid: int) -> str | None:
    """Process state letter from /proc/<pid>/stat, None if the pid is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[0].decode()


def cgroup_own_dirs() -> list[Path]:
    """This process's own cgroup in each v1 hierarchy a job joins (a test server's too)."""
    from jobworker.cgroups import layout  # noqa: PLC0415 (only the cgroup tests need it)

    mounts = layout.parse_mountinfo(layout.MOUNTINFO.read_text())
    own = layout.parse_proc_cgroup(layout.PROC_SELF_CGROUP.read_text())
    found = layout.v1_hierarchies(mounts, own, layout.V1_CONTROLLERS)
    return list(dict.fromkeys(h.own_dir for h in found.values()))


def in_throttled_io(pid: int, command: bytes) -> bool:
    """True while ``pid`` runs ``command`` (it has exec'd: not its launch shim) and sleeps in
    the kernel (D state), as a process waiting for throttled IO does.

    Read from /proc/<pid>/stat alone: its comm is the exec'd program's name, and unlike
    cmdline it is read without touching the process's memory.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    comm = data[data.find(b"(") + 1 : data.rfind(b")")]
    return comm == command[:15] and data[data.rfind(b")") + 2 :][:1] == b"D"


def describe_processes(pids: Iterable[int]) -> str:
    """One "pid state comm wchan" entry per pid, for a failure message."""
    entries = []
    for pid in pids:
        try:
            data = Path(f"/proc/{pid}/stat").read_bytes()
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            continue
        comm = data[data.find(b"(") + 1 : data.rfind(b")")].decode(errors="replace")
        state = data[data.rfind(b")") + 2 :][:1].decode()
        entries.append(f"{pid} {state} {comm} {wchan or '-'}")
    return "; ".join(entries) or "none"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (dead but unreaped counts as gone)."""
    return proc_state(pid) not in (None, "Z", "X")


def live_parents() -> dict[int, int]:
    """pid -> ppid of every live (non-zombie) process."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and fields[0] not in (b"Z", b"X"):
                parents[int(entry.name)] = int(fields[1])
    return parents


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    return [child for child, ppid in live_parents().items() if ppid == pid]


def descendants(root: int) -> set[int]:
    """Live descendants of ``root``, following ppid links."""
    parents = live_parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


# Extra flags for every test server, e.g. "--cgroups off" to run the suite on a host without
# usable cgroups, or "--log-level DEBUG" when chasing a failure.
ENV_EXTRA_ARGS = "JOBWORKER_TEST_SERVER_ARGS"


def server_command(certs_dir: Path, data_dir: Path, *extra_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobworker.server",
        "--listen",
        "127.0.0.1:0",
        "--certs-dir",
        str(certs_dir),
        "--data-dir",
        str(data_dir),
        *shlex.split(os.environ.get(ENV_EXTRA_ARGS, "")),
        *extra_args,
    ]


def grpc_credentials(test_pki: TestPKI, stem: str) -> grpc.ChannelCredentials:
    """Channel credentials for the client pair ``<stem>-cert.pem`` / ``<stem>-key.pem``."""
    return grpc.ssl_channel_credentials(
        root_certificates=test_pki.ca_cert.read_bytes(),
        private_key=test_pki.key(stem).read_bytes(),
        certificate_chain=test_pki.cert(stem).read_bytes(),
    )


def placed_argv(cgroup: JobCgroup, argv: Sequence[str]) -> list[str]:
    """argv that joins every cgroup of ``cgroup`` and then execs ``argv``: how the driver
    tests start a process inside a job's cgroups without the launcher (``echo $$`` writes the
    shell's own pid, which ``exec`` keeps)."""
    files = cgroup.procs_files()
    if not files:
        return list(argv)
    writes = " && ".join(f"echo $$ >{shlex.quote(str(path))}" for path in files)
    return ["/bin/sh", "-c", f'{writes} && exec "$@"', "placed", *argv]


def job_request(command: str, args: Sequence[str] = (), **limits: int) -> worker_pb2.CreateJobReq:
    """A CreateJobReq with the given limits (``maxCPU=50, maxMemory=64, ...``) set by name."""
    request = worker_pb2.CreateJobReq(command=command, args=list(args))
    for name, value in limits.items():
        setattr(request, name, value)
    return request


def wait_job_ended(stub: Any, job_id: str, deadline_s: float = 30.0) -> Any:
    """GetJob through a grpcio ``stub``, polled with a deadline until the job has ended; the
    last answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        job = stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=10)
        if job.status not in ("INITIALIZING", "RUNNING"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.02)  # polling the job's status, with a deadline


class CutFirstProxy:
    """A TCP proxy to ``target``. The first connection is cut, both ways, at the first bytes
    the server sends once ``cut_when()`` holds (they are not passed on); later connections
    pass everything."""

    def __init__(self, target: tuple[str, int], cut_when: Callable[[], bool]) -> None:
        self._target = target
        self._cut_when = cut_when
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # how often the accept loop looks at _closing
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted = 0
        self.cut = threading.Event()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            first = self.accepted == 0
            self.accepted += 1
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for args in ((client, upstream, False), (upstream, client, first)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, cut: bool) -> None:
        try:
            while data := source.recv(65536):
                if cut and self._cut_when():
                    self.cut.set()
                    for sock in (source, sink):
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10.0)
        for sock in [*self._sockets, self._listener]:
            sock.close()


def cli_flags(test_pki: TestPKI, address: str, stem: str = "admin-client") -> list[str]:
    """The CLI's connection flags for ``address`` as the ``stem`` certificate's holder."""
    return [
        "--server", address,
        "--cert", str(test_pki.cert(stem)),
        "--key", str(test_pki.key(stem)),
        "--ca", str(test_pki.ca_cert),
    ]  # fmt: skip
