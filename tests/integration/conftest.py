"""Fixtures that run the real server: a ``jobworker.server`` subprocess on port 0 with real TLS.

Interface (stable; other test modules rely on it):

- ``ServerProc``: address/host/port, data_dir, certs_dir, the Popen, ``log_text()``.
- ``start_server(test_pki, tmp_path, *extra_args)``: a context manager that starts a server
  (``--listen 127.0.0.1:0``, the test PKI, ``tmp_path/"data"``) and yields a ServerProc once it
  printed ``listening on HOST:PORT``; on exit it stops the server with SIGTERM and checks a clean
  exit (code 0 within 10 s, no child process left). Extra args are appended to the command line
  (a later flag overrides an earlier one, so ``"--listen", "[::1]:0"`` works).
- ``server`` fixture: ``start_server`` with no extra args.
- ``grpc_channel_for`` fixture: ``stem -> grpc.Channel`` (e.g. "admin-client",
  "viewer-client", "noou-client"), built as the spec's Python example does; closed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
import pytest

from jobworker.server.app import instance_name
from tests.support import descendants, grpc_credentials, pid_alive, server_command

if TYPE_CHECKING:
    from tests.conftest import TestPKI

STARTUP_TIMEOUT_S = 15.0  # a cold interpreter imports trio, purerpc, protobuf: ~1 s, slack for CI
SHUTDOWN_TIMEOUT_S = 10.0  # the brief's bound on a graceful exit
LISTENING_RE = re.compile(r"listening on ([^\s\"]+)")  # a text line or a JSON one
DEBUG_RE = re.compile(r"debug: tasks=(\d+) connections=(\d+)")


@dataclass
class ServerProc:
    """A running server subprocess."""

    address: str  # "127.0.0.1:PORT" (or "[::1]:PORT")
    host: str
    port: int
    data_dir: Path
    certs_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log_text(self) -> str:
        """The server's stderr so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
        """Poll the log until ``pattern`` (a regex) matches ``count`` times; return the log."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.log_text()
            if len(regex.findall(text)) >= count:
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}):\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the server log in {timeout}s:\n{text}")
            time.sleep(0.02)

    def children(self) -> list[int]:
        """Pids of the server's live descendants (zombies excluded)."""
        return sorted(descendants(self.process.pid))

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def debug_counts(self, timeout: float = 5.0) -> tuple[int, int]:
        """(tasks, connections) from the line the server logs on SIGUSR1."""
        before = len(DEBUG_RE.findall(self.log_text()))
        self.process.send_signal(signal.SIGUSR1)
        text = self.wait_for_log(DEBUG_RE.pattern, timeout, count=before + 1)
        tasks, connections = DEBUG_RE.findall(text)[before]
        return int(tasks), int(connections)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
        """Signal the server and wait for it; return its exit code (kills it after timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"server did not exit within {timeout}s of signal {sig}:\n{self.log_text()}"
            ) from None
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        text = log_path.read_text(errors="replace")
        match = LISTENING_RE.search(text)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening:\n{text}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server not listening within {STARTUP_TIMEOUT_S}s:\n{text}")
        time.sleep(0.02)


@contextlib.contextmanager
def start_server(
    test_pki: TestPKI,
    tmp_path: Path,
    *extra_args: str,
    expect_exit: int | None = 0,
    wrapper: Sequence[str] = (),
) -> Iterator[ServerProc]:
    """Run a server for the duration of the block; assert a clean SIGTERM exit afterwards.

    The block may stop the server itself (``srv.stop()``); then only the checks run.
    ``expect_exit=None`` skips the exit checks (a test that kills the server on purpose).
    """
    data_dir = tmp_path / "data"
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [*wrapper, *server_command(test_pki.dir, data_dir, *extra_args)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd=tmp_path,
    )
    try:
        address = _wait_listening(proc, log_path)
    except BaseException:
        log.close()
        raise
    host, _, port = address.rpartition(":")
    srv = ServerProc(
        address=address,
        host=host.strip("[]"),
        port=int(port),
        data_dir=data_dir,
        certs_dir=test_pki.dir,
        process=proc,
        log_path=log_path,
        _log=log,
    )
    ok = False
    try:
        yield srv
        ok = True
    finally:
        # the descendants must be read while the server is alive to know who they are
        before = set(srv.children()) if proc.poll() is None else set()
        code = srv.stop()
        leftovers = [pid for pid in before if pid_alive(pid)]
        for pid in leftovers:  # never leave a stray process behind a failing test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if ok and expect_exit is not None:
            assert code == expect_exit, f"server exit code {code}:\n{srv.log_text()}"
            assert not leftovers, f"processes left after the server exited: {leftovers}"
            if code == 0:
                left = _cgroup_subtrees(data_dir)
                assert not left, f"cgroups left after the server exited: {left}"


def _cgroup_subtrees(data_dir: Path) -> list[Path]:
    """This server's job-cgroup subtree, where it still exists, in each hierarchy whose own
    cgroup is the root (all but memory on our hosts: a cheap, not exhaustive, check)."""
    instance = instance_name(data_dir)
    return [top / instance for top in Path("/sys/fs/cgroup").glob("*") if (top / instance).is_dir()]


@pytest.fixture
def server(test_pki: TestPKI, tmp_path: Path) -> Iterator[ServerProc]:
    with start_server(test_pki, tmp_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def module_server(
    test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    """One server shared by every test of a module (starting one per test costs ~1 s): for
    tests that only need a server to talk to, not a fresh one."""
    with start_server(test_pki, tmp_path_factory.mktemp("module-server")) as srv:
        yield srv


ServerFactory = Callable[..., contextlib.AbstractContextManager[ServerProc]]


@pytest.fixture
def server_factory(test_pki: TestPKI, tmp_path: Path) -> ServerFactory:
    """``start_server`` bound to this test's PKI and tmp_path: ``with server_factory(*args)``.

    (A fixture, so test modules need not import this conftest: ``tests`` is not a package.)
    Each server started gets its own data dir below tmp_path.
    """
    count = 0

    def factory(
        *extra_args: str, expect_exit: int | None = 0, wrapper: Sequence[str] = ()
    ) -> contextlib.AbstractContextManager[ServerProc]:
        nonlocal count
        count += 1
        directory = tmp_path / f"server{count}" if count > 1 else tmp_path
        directory.mkdir(exist_ok=True)
        return start_server(
            test_pki, directory, *extra_args, expect_exit=expect_exit, wrapper=wrapper
        )

    return factory


@pytest.fixture
def grpc_credentials_for(test_pki: TestPKI) -> Callable[[str], grpc.ChannelCredentials]:
    """``stem -> grpc.ChannelCredentials`` (for channels a test opens and closes itself)."""
    return lambda stem: grpc_credentials(test_pki, stem)


@pytest.fixture
def grpc_channel_for(
    test_pki: TestPKI, server: ServerProc
) -> Iterator[Callable[[str], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def make(stem: str) -> grpc.Channel:
        channel = grpc.secure_channel(server.address, grpc_credentials(test_pki, stem))
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()
