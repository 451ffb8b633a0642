"""Job isolation through the real server (root, real namespaces and cgroups): what a job can
see and touch with the default isolation, what stays as it was (exit codes, OOM, stops,
placement), the opt-in network namespace, a launcher that dies, and the start-up checks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.launch.users import DEFAULT_UID_RANGE
from tests.support import grpc_credentials, job_request, pid_alive, server_command, skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

pytestmark = pytest.mark.cgroups

Stub = worker_pb2_grpc.JobServiceStub
FIRST_UID = int(DEFAULT_UID_RANGE.split("-")[0])


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    skip_unless(os.geteuid() == 0, "namespaces and job uids need root")


@contextmanager
def admin_stub(test_pki: TestPKI, srv: ServerProc) -> Iterator[Stub]:
    with grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client")) as channel:
        yield worker_pb2_grpc.JobServiceStub(channel)


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def create(stub: Stub, command: str, *args: str, **limits: int) -> str:
    req = job_request(command, args, **limits)
    return str(stub.CreateJob(req, timeout=10).id)


def output(stub: Stub, job_id: str) -> str:
    """The job's whole output (the stream ends once the job has ended)."""
    chunks = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=30)
    return b"".join(chunk.payload for chunk in chunks).decode(errors="replace")


def finished(stub: Stub, job_id: str) -> worker_pb2.GetJobRes:
    output(stub, job_id)  # ends once the job has ended
    return stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5)


def run(stub: Stub, script: str) -> tuple[str, worker_pb2.GetJobRes]:
    job_id = create(stub, "sh", "-c", script)
    text = output(stub, job_id)  # ends once the job has ended
    return text, stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=5)


def stream_head(stub: Stub, job_id: str) -> str:
    """The first chunk of the job's output; the stream is cancelled, not left open."""
    chunks = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=10)
    try:
        return next(iter(chunks)).payload.decode(errors="replace")
    finally:
        chunks.cancel()


def test_a_job_sees_only_its_own_processes_and_runs_as_its_own_uid(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with admin_stub(test_pki, server) as stub:
        text, job = run(stub, "ls /proc | grep -c '^[0-9]'; id -u; id -G; cat /proc/self/cgroup")
        assert job.status == "COMPLETED", text
        count, uid, groups, *cgroups = text.splitlines()
        assert int(count) <= 5  # the init, sh, ls, grep: not the host's processes
        assert int(uid) >= FIRST_UID
        assert groups == uid  # its own gid, no supplementary groups
        assert cgroups
        assert all(line.endswith(":/") for line in cgroups)  # its own cgroup is its root


def test_a_jobs_cgroup_files_show_its_own_cgroup_as_the_root(
    server: ServerProc, test_pki: TestPKI
) -> None:
    """/sys/fs/cgroup inside a job is mounted afresh in its cgroup namespace: each hierarchy's
    root is the job's own cgroup (its limits at the top, no other job below), read-only."""
    with admin_stub(test_pki, server) as stub:
        other = create(stub, "sleep", "100")
        script = (
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
            "find /sys/fs/cgroup -mindepth 2 -type d | wc -l; "
            "touch /sys/fs/cgroup/memory/x 2>&1 | grep -c 'Read-only'"
        )
        job_id = create(stub, "sh", "-c", script, maxMemory=64)
        text = output(stub, job_id)
        limit, subdirs, read_only = text.split()
        assert int(limit) == 64 * 1024 * 1024  # the job's own limit, at the root
        assert subdirs == "0"  # no other job's cgroup, no server subtree
        assert read_only == "1"
        stub.StopJob(worker_pb2.StopJobReq(id=other), timeout=10)


def test_a_job_has_its_own_ipc_namespace_and_pseudo_terminals(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with admin_stub(test_pki, server) as stub:
        text, job = run(stub, "readlink /proc/self/ns/ipc; stat -c %d /dev/pts")
    ipc, pts_device = text.split()
    assert job.status == "COMPLETED"
    assert ipc != os.readlink("/proc/self/ns/ipc")  # no shared memory or queues with others
    assert int(pts_device) != os.stat("/dev/pts").st_dev  # ptys from an instance of its own


def test_two_running_jobs_never_share_a_uid(server: ServerProc, test_pki: TestPKI) -> None:
    with admin_stub(test_pki, server) as stub:
        first = create(stub, "sh", "-c", "id -u; sleep 100")
        second = create(stub, "sh", "-c", "id -u; sleep 100")

        assert stream_head(stub, first).strip() != stream_head(stub, second).strip()
        for job_id in (first, second):
            stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)


def test_a_job_cannot_reach_the_servers_secrets_other_jobs_or_its_own_limits(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with admin_stub(test_pki, server) as stub:
        other = create(stub, "sh", "-c", "echo secret output; sleep 100")
        poll(lambda: "secret" in stream_head(stub, other), 10, "the other job's output")
        data = server.data_dir.resolve()
        attempts = {
            "server key": f"cat {test_pki.dir / 'server-key.pem'}",
            "CA key": f"cat {test_pki.dir / 'ca-key.pem'}",
            "other output": f"cat {data / 'jobs' / other / 'output.log'}",
            "other record": f"cat {data / 'jobs' / other / 'job.json'}",
            "other work dir": f"touch {data / 'jobs' / other / 'work' / 'planted'}",
            "server signal": f"kill -0 {server.process.pid}",
            "own memory limit": "for f in /sys/fs/cgroup/memory/memory.limit_in_bytes "
            "/sys/fs/cgroup/memory.max; do [ -e $f ] && echo 1 > $f && exit 0; done; exit 1",
            "parent cgroup": "for f in /sys/fs/cgroup/*/cgroup.procs; do "
            "echo $$ > $f 2>/dev/null && exit 0; done; exit 1",
            "host files": "touch /usr/planted",
        }
        for what, script in attempts.items():
            text, job = run(stub, f"{script} 2>&1")
            assert job.status == "FAILED", f"{what} succeeded: {text!r}"
            assert job.exitCode != 0
        assert not (data / "jobs" / other / "work" / "planted").exists()
        assert not Path("/usr/planted").exists()
        stub.StopJob(worker_pb2.StopJobReq(id=other), timeout=10)


def test_a_job_has_a_private_tmp_and_home_in_its_work_dir(
    server: ServerProc, test_pki: TestPKI
) -> None:
    marker = Path("/tmp") / f"jobworker-isolation-{os.getpid()}"
    marker.write_text("host")
    try:
        with admin_stub(test_pki, server) as stub:
            text, job = run(
                stub, f"ls {marker} 2>&1; echo x > /tmp/mine && cat /tmp/mine; pwd; echo $HOME"
            )
        lines = text.splitlines()
        assert job.status == "COMPLETED", text
        assert "No such file" in lines[0]  # the host's /tmp is not the job's
        work = str(server.data_dir.resolve() / "jobs" / job.id / "work")
        assert lines[1:] == ["x", work, work]
        assert not Path("/tmp/mine").exists()
    finally:
        marker.unlink()


def test_a_mount_inside_a_job_is_invisible_outside(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    # Only a root job may mount at all: its mount namespace is what keeps the mount inside.
    with server_factory("--job-user", "root") as srv, admin_stub(test_pki, srv) as stub:
        job_id = create(
            stub, "sh", "-c", "mkdir -p m && mount -t tmpfs jobtmpfs m && echo mounted; sleep 100"
        )
        poll(lambda: "mounted" in stream_head(stub, job_id), 10, "the mount")
        assert "jobtmpfs" not in Path("/proc/self/mounts").read_text()
        stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)


def test_exit_codes_oom_and_stops_are_as_without_isolation(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with admin_stub(test_pki, server) as stub:
        _, three = run(stub, "exit 3")
        assert (three.status, three.exitCode) == ("FAILED", 3)
        _, killed = run(stub, "kill -TERM $$")  # the command's own signal, through the init
        assert (killed.status, killed.exitCode) == ("FAILED", 143)
        server.wait_for_log(re.escape("job 2 ended: FAILED, exit code 143 (killed by signal 15)"))
        hog = "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'"
        oom = create(stub, "sh", "-c", hog, maxMemory=50)
        ended = finished(stub, oom)
        assert (ended.status, ended.exitCode) == ("FAILED", 137)
        sleeper = create(stub, "sleep", "100")
        stopped = stub.StopJob(worker_pb2.StopJobReq(id=sleeper), timeout=10)
        assert (stopped.status, stopped.exitCode) == ("STOPPED", 143)  # not 137 after the grace


def test_a_setsid_tree_ignoring_sigterm_is_gone_after_the_grace(
    server: ServerProc, test_pki: TestPKI
) -> None:
    tree = "for i in 1 2 3; do setsid sh -c 'trap \"\" TERM; sleep 300' & done; echo up; wait"
    with admin_stub(test_pki, server) as stub:
        job_id = create(stub, "sh", "-c", tree)
        poll(lambda: "up" in stream_head(stub, job_id), 10, "the tree")
        before = server.children()
        stopped = stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
        assert stopped.status == "STOPPED"
        launcher = _launcher_pid(server)
        left = [pid for pid in before if pid != launcher and pid_alive(pid)]
        assert left == []


def test_every_descendant_is_placed_before_the_command_runs(
    server: ServerProc, test_pki: TestPKI
) -> None:
    """20 of 20: a job that forks at once has every process in its cgroups (a stop kills
    them all, nothing is left outside)."""
    with admin_stub(test_pki, server) as stub:
        for _ in range(20):
            job_id = create(stub, "sh", "-c", "sleep 301 & sleep 302 & sleep 303")
            stopped = stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
            assert stopped.status in ("STOPPED", "COMPLETED")
        launcher = _launcher_pid(server)
        assert [pid for pid in server.children() if pid != launcher] == []


def test_a_command_the_job_user_cannot_execute_is_refused_before_the_start(
    server: ServerProc, test_pki: TestPKI, tmp_path: Path
) -> None:
    private = tmp_path / "private-tool"
    private.write_text("#!/bin/sh\necho hi\n")
    private.chmod(0o700)  # root may run it, the job's user may not
    with admin_stub(test_pki, server) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            create(stub, str(private))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            f"command is not executable: {private} (permission denied for the job user)"
        )
        listed = stub.GetJobs(worker_pb2.EmptyRequest(), timeout=5).jobs
        assert list(listed) == []  # no id was used


def test_with_net_a_job_has_only_loopback_and_cannot_reach_the_host(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        with server_factory("--isolation", "pid,mount,cgroup,net") as srv:  # noqa: SIM117
            with admin_stub(test_pki, srv) as stub:
                text, job = run(stub, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
                assert (job.status, text.split()) == ("COMPLETED", ["lo"])
                reach = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
                text, job = run(stub, f'python3 -c "{reach}" 2>&1')
                assert job.status == "FAILED", text
                assert "refused" in text.lower()


def test_isolation_none_shares_the_hosts_namespaces(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory("--isolation", "none", "--job-user", "root") as srv:
        with admin_stub(test_pki, srv) as stub:
            text, job = run(stub, "ls /proc | grep -c '^[0-9]'; id -u; readlink /proc/self/ns/pid")
        count, uid, pidns = text.splitlines()
        assert job.status == "COMPLETED"
        assert int(count) > 5
        assert uid == "0"
        assert pidns == os.readlink("/proc/self/ns/pid")
        assert "job isolation: none; jobs run as the server's user (uid 0)" in srv.log_text()


def test_the_start_line_says_what_is_enforced(server: ServerProc) -> None:
    assert (
        f"job isolation: pid, mount, cgroup; jobs run as their own uid from {DEFAULT_UID_RANGE}"
        in server.log_text()
    )


def test_a_killed_launcher_fails_its_jobs_and_is_restarted(
    server: ServerProc, test_pki: TestPKI
) -> None:
    with admin_stub(test_pki, server) as stub:
        job_id = create(stub, "sleep", "100")
        launcher = _launcher_pid(server)
        job_pids = [pid for pid in server.children() if pid != launcher]
        assert job_pids
        os.kill(launcher, signal.SIGKILL)
        ended = finished(stub, job_id)
        assert ended.status == "FAILED"
        assert ended.exitCode == -1
        assert not any(pid_alive(pid) for pid in job_pids)
        server.wait_for_log("the launcher .* died")
        text, again = run(stub, "echo again")
        assert (again.status, text) == ("COMPLETED", "again\n")


def _launcher_pid(server: ServerProc) -> int:
    for pid in server.children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"jobworker.launch.process" in cmdline and _ppid(pid) == server.process.pid:
            return pid
    raise AssertionError("no launcher process")


def _ppid(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[1])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--isolation", "pid,bogus"), "--isolation must be auto, none or a list of"),
        (("--job-uid-range", "1-10"), "job uid range 1-10 overlaps /etc/passwd entry 'daemon' (1)"),
        (("--job-user", "no-such-user-here"), "job user 'no-such-user-here' does not exist"),
    ],
)
def test_unusable_isolation_settings_refuse_the_start_in_one_line(
    test_pki: TestPKI, tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        server_command(test_pki.dir, tmp_path / "data", *flags),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
