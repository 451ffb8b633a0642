"""The jobworker-server command: flags, the one ``listening on`` line, exit codes, log format."""

from __future__ import annotations

import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import server_command

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

Credentials = Callable[[str], grpc.ChannelCredentials]
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ \S"
)


def run_server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobworker.server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


@pytest.mark.parametrize("missing", ["ca-cert.pem", "server-cert.pem", "server-key.pem"])
def test_a_missing_certificate_file_exits_2_with_one_line(
    test_pki: TestPKI, tmp_path: Path, missing: str
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        if name != missing:
            (certs / name).write_bytes((test_pki.dir / name).read_bytes())
    result = run_server("--certs-dir", str(certs), "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"jobworker-server: cannot read {certs / missing}: No such file or directory"
    ]


def test_a_garbage_key_exits_2_without_a_traceback(test_pki: TestPKI, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (certs / name).write_bytes((test_pki.dir / name).read_bytes())
    (certs / "server-key.pem").write_text("not a key\n")
    result = run_server("--certs-dir", str(certs), cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("jobworker-server: invalid server certificate or key in ")


@pytest.mark.parametrize("listen", ["localhost", "1.2.3.4:99999", "[::1]", "::1:50051", ":80"])
def test_a_bad_listen_address_is_a_usage_error(tmp_path: Path, listen: str) -> None:
    result = run_server("--listen", listen, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("jobworker-server: argument --listen: ")
    assert line.endswith(" (see --help)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--pids-max", "0"], "argument --pids-max: must be >= 1: '0'"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_server(*args, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"jobworker-server: {message}")


def test_log_level_has_help_text(tmp_path: Path) -> None:
    result = run_server("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "least severe level logged" in " ".join(result.stdout.split())


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("max-connections = 0\n")
    result = run_server("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"jobworker-server: config file {config}: max-connections: must be >= 1: '0'"
    ]


def test_print_config_prints_toml_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("pids-max = 12\n")
    result = run_server("--config", str(config), "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"pids-max = 12  # file {config}" in result.stdout.splitlines()
    assert not (tmp_path / "var").exists()  # nothing started


@pytest.mark.parametrize("how", ["a file", "under a file"])
def test_an_unusable_data_dir_is_one_line_and_exit_2(
    test_pki: TestPKI, tmp_path: Path, how: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    data_dir = blocker if how == "a file" else blocker / "data"
    result = run_server(
        "--listen", "127.0.0.1:0", "--certs-dir", str(test_pki.dir), "--data-dir", str(data_dir),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    why = "File exists" if how == "a file" else "Not a directory"
    assert result.stderr.splitlines()[-1] == (
        f"jobworker-server: cannot use data dir {data_dir}: {why}"
    )
    assert "Traceback" not in result.stderr


def test_a_certificate_path_that_is_a_directory_is_one_line_and_exit_2(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca-cert.pem", "server-key.pem"):
        (certs / name).write_bytes((test_pki.dir / name).read_bytes())
    (certs / "server-cert.pem").mkdir()
    result = run_server("--certs-dir", str(certs), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"jobworker-server: cannot read {certs / 'server-cert.pem'}: Is a directory"
    ]


def test_an_address_in_use_exits_2_with_one_line(
    server: ServerProc, test_pki: TestPKI, tmp_path: Path
) -> None:
    result = run_server(
        "--listen",
        server.address,
        "--certs-dir",
        str(test_pki.dir),
        "--data-dir",
        str(tmp_path / "other"),
        "--cgroups",
        "off",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"jobworker-server: cannot listen on {server.address}: Address already in use"
    )
    assert "Traceback" not in result.stderr


def test_it_prints_listening_once_and_logs_one_line_per_record(server: ServerProc) -> None:
    lines = server.log_text().splitlines()
    assert lines.count(f"listening on {server.address}") == 1
    assert server.port != 0
    assert all(LOG_LINE.match(line) for line in lines if not line.startswith("listening on"))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_it_listens_on_ipv6(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    with server_factory("--listen", "[::1]:0") as srv:
        assert re.fullmatch(r"\[::1\]:\d+", srv.address)
        with grpc.secure_channel(srv.address, grpc_credentials_for("admin-client")) as channel:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            assert stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs == []


def test_it_listens_only_on_the_given_address(server: ServerProc) -> None:
    # Bound to 127.0.0.1 only: another loopback address of 127/8 gets no answer.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()


def test_the_entry_point_is_installed() -> None:
    from importlib.metadata import entry_points  # noqa: PLC0415

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "jobworker-server"]
    assert script.value == "jobworker.server.main:main"


def test_a_second_server_on_the_same_data_dir_exits_2(
    server: ServerProc, test_pki: TestPKI, tmp_path: Path
) -> None:
    result = run_server(
        "--listen",
        "127.0.0.1:0",
        "--certs-dir",
        str(test_pki.dir),
        "--data-dir",
        str(server.data_dir),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"jobworker-server: data dir {server.data_dir} is in use by another jobworker-server"
    )
    assert "Traceback" not in result.stderr


def test_servers_on_other_data_dirs_leave_each_others_jobs_alone(
    server_factory: ServerFactory, grpc_credentials_for: Credentials
) -> None:
    """Each server has its own cgroup subtree: starting (and stopping) another one on the same
    host neither sweeps nor collides with this one's running job "1"."""
    with (
        server_factory() as first,
        grpc.secure_channel(first.address, grpc_credentials_for("admin-client")) as channel,
    ):
        stub = worker_pb2_grpc.JobServiceStub(channel)
        job = stub.CreateJob(worker_pb2.CreateJobReq(command="sleep", args=["30"]), timeout=10)
        assert job.id == "1"
        with (
            server_factory() as other,
            grpc.secure_channel(other.address, grpc_credentials_for("admin-client")) as ch2,
        ):
            assert other.data_dir != first.data_dir
            other_stub = worker_pb2_grpc.JobServiceStub(ch2)
            theirs = other_stub.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
            assert theirs.id == "1"
        assert stub.GetJob(worker_pb2.GetJobReq(id="1"), timeout=10).status == "RUNNING"
        stopped = stub.StopJob(worker_pb2.StopJobReq(id="1"), timeout=10)
        assert (stopped.status, stopped.exitCode) == ("STOPPED", 143)


def test_the_open_file_limit_is_raised_to_the_hard_limit(server_factory: ServerFactory) -> None:
    """A soft limit of 1024 is below --max-connections' default alone: the server raises it
    (to the hard limit) at start, so connections and jobs do not fail with EMFILE."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with server_factory(wrapper=["prlimit", f"--nofile={min(256, hard)}:{hard}"]) as srv:
        limits = Path(f"/proc/{srv.process.pid}/limits").read_text()
    [row] = [r for r in limits.splitlines() if r.startswith("Max open files")]
    assert row.split()[3] == str(hard)


# Open-file limits (soft and hard) tried by the next test, from one the interpreter imports the
# server with to one it runs with: on the way, each step of the start runs out of descriptors.
FD_LIMITS = range(8, 65)
START_S = 20.0  # a run that has neither listened nor exited by then hangs: a failure


@pytest.mark.time_limit(180)
def test_every_start_failure_is_one_line_and_exit_2_whatever_fails(
    test_pki: TestPKI, tmp_path: Path
) -> None:
    """An open-file limit too low to start makes a different step fail at each value (trio's
    own set-up, the data dir's lock, the listening socket, the reaper, the launcher): each
    such failure before the server listens is one line and exit 2, never a CRITICAL
    traceback and exit 1, however unexpected its exception."""
    failures: dict[int, str] = {}
    listened = None
    for limit in FD_LIMITS:
        log_path = tmp_path / f"server-{limit}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *("prlimit", f"--nofile={limit}:{limit}"),
                    *server_command(test_pki.dir, tmp_path / f"data-{limit}"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
            deadline = time.monotonic() + START_S
            try:
                while proc.poll() is None and "listening on" not in log_path.read_text():
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                code = proc.wait(30)
        text = log_path.read_text()
        if "listening on" in text:
            assert code == 0, text
            listened = limit
            break
        lines = text.splitlines()
        assert code == 2, f"limit {limit}: exit {code}\n{text}"
        assert lines[-1].startswith("jobworker-server: "), text
        assert sum(line.startswith("jobworker-server: ") for line in lines) == 1, text
        assert "Traceback" not in text
        assert "CRITICAL" not in text
        failures[limit] = lines[-1]
    assert listened is not None, failures
    # Not only the failures that were always one line: some came from further in the start.
    assert any("cannot use data dir" not in why for why in failures.values()), failures
    assert any("cannot listen" not in why and "data dir" not in why for why in failures.values())
