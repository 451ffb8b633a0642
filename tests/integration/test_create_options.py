"""CreateJob's timeoutSeconds, env and workingDir through the real server (grpcio, the CLI):
what reaches the job, what is refused (INVALID_ARGUMENT saying which, nothing started), and
what the job messages say was applied.

Jobs run as a uid of their own, in a mount namespace where the host is read-only and /tmp is
private: directories they are to use are made under /var/tmp or /tmp, searchable by all.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from tests.support import (
    JOB_PYTHON,
    cli_flags,
    grpc_credentials,
    server_command,
    skip_unless,
)
from tests.support import wait_job_ended as ended

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

TIMEOUT = 10.0
# A timed-out job ends after its limit plus the stop path (grace, kill, reap): generous, it
# proves "promptly", not a latency.
STOP_SLACK_S = 5.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@contextlib.contextmanager
def open_stub(test_pki: TestPKI, server: ServerProc) -> Iterator[Any]:
    with grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client")) as ch:
        yield worker_pb2_grpc.JobServiceStub(ch)


@pytest.fixture(scope="module")
def stub(test_pki: TestPKI, module_server: ServerProc) -> Iterator[Any]:
    with open_stub(test_pki, module_server) as module_stub:
        yield module_stub


@pytest.fixture
def host_dir() -> Iterator[Callable[..., Path]]:
    """``make(base="/var/tmp", mode=0o755)``: a fresh directory on the host, removed after."""
    made: list[Path] = []

    def make(base: str = "/var/tmp", mode: int = 0o755) -> Path:
        path = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir=base))
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def create(stub: Any, command: str, *args: str, **fields: Any) -> Any:
    request = worker_pb2.CreateJobReq(command=command, args=list(args), **fields)
    return stub.CreateJob(request, timeout=TIMEOUT)


def refused(stub: Any, command: str = "true", **fields: Any) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        create(stub, command, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


def output(stub: Any, job_id: str) -> bytes:
    """The whole output of an ended job."""
    stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=TIMEOUT)
    return b"".join(chunk.payload for chunk in stream)


def job_ids(stub: Any) -> list[str]:
    return [job.id for job in stub.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs]


# -- timeoutSeconds --------------------------------------------------------------------------


def test_a_job_past_its_time_is_stopped_and_failed(stub: Any) -> None:
    started = time.monotonic()
    job = create(stub, "sleep", "100", timeoutSeconds=1)
    assert (job.status, job.timeoutSeconds) == ("RUNNING", 1)
    final = ended(stub, job.id, deadline_s=1 + STOP_SLACK_S)
    took = time.monotonic() - started
    assert 1.0 <= took < 1 + STOP_SLACK_S, took
    assert (final.status, final.reason, final.exitCode) == ("FAILED", "timed out after 1 s", 143)
    assert final.timeoutSeconds == 1
    # The job messages of every RPC say so: listings too.
    [listed] = [
        j for j in stub.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs if j.id == job.id
    ]
    assert (listed.timeoutSeconds, listed.reason) == (1, "timed out after 1 s")


def test_a_negative_timeout_is_refused(stub: Any) -> None:
    before = job_ids(stub)
    assert refused(stub, timeoutSeconds=-1) == "timeoutSeconds must not be negative, got -1"
    assert job_ids(stub) == before


def test_the_default_and_the_maximum_timeout_flags(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with (
        server_factory("--default-job-timeout", "1", "--max-job-timeout", "30") as srv,
        open_stub(test_pki, srv) as own,
    ):
        job = create(own, "sleep", "100")  # asks for none: the server's default
        assert job.timeoutSeconds == 1
        assert refused(own, timeoutSeconds=31) == (
            "timeoutSeconds must be at most 30 (the server's --max-job-timeout), got 31"
        )
        allowed = create(own, "true", timeoutSeconds=30)
        assert allowed.timeoutSeconds == 30
        final = ended(own, job.id, deadline_s=1 + STOP_SLACK_S)
        assert (final.status, final.reason) == ("FAILED", "timed out after 1 s")
        assert job_ids(own) == [job.id, allowed.id]  # the refused create used no id


def test_a_default_above_the_maximum_refuses_the_start(test_pki: TestPKI, tmp_path: Path) -> None:
    command = server_command(
        test_pki.dir, tmp_path / "data", "--default-job-timeout", "60", "--max-job-timeout", "30"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "jobworker-server: default-job-timeout (60 s) is above max-job-timeout (30 s)"
    )


def test_check_names_the_job_time_limits(test_pki: TestPKI, tmp_path: Path) -> None:
    command = server_command(test_pki.dir, tmp_path / "data", "--max-job-timeout", "30", "--check")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    [line] = [line for line in result.stdout.splitlines() if " would enforce: " in line]
    assert "stop grace 0.1 s, job timeout 30 s unless asked, at most 30 s, " in line


# -- env -------------------------------------------------------------------------------------


def test_env_reaches_the_job_and_is_returned_as_requested(stub: Any) -> None:
    env = {"GREETING": "hello world", "EMPTY": "", "UNICODE": "héllo"}
    job = create(stub, "env", env=env)
    assert dict(job.env) == env
    assert ended(stub, job.id).status == "COMPLETED"
    seen = dict(line.split("=", 1) for line in output(stub, job.id).decode().splitlines())
    assert {name: seen[name] for name in env} == env
    assert seen["PATH"] == DEFAULT_PATH  # the rest of the clean environment is still there
    assert seen["HOME"].endswith(f"/jobs/{job.id}/work")
    got = stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT)
    assert dict(got.env) == env


def test_a_path_of_the_clients_resolves_the_command(
    stub: Any, host_dir: Callable[..., Path]
) -> None:
    tools = host_dir()
    tool = tools / "hello-tool"
    tool.write_text('#!/bin/sh\necho "found as $0"\n')
    tool.chmod(0o755)
    assert refused(stub, "hello-tool") == "command not found in PATH: hello-tool"
    job = create(stub, "hello-tool", env={"PATH": f"{tools}:/usr/bin:/bin"})
    assert ended(stub, job.id).status == "COMPLETED"
    assert output(stub, job.id) == f"found as {tool}\n".encode()
    # The client's PATH is the only one searched.
    assert refused(stub, "sh", env={"PATH": str(tools)}) == "command not found in PATH: sh"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"": "x"}, "env names must not be empty"),
        ({"A=B": "x"}, "env names must not contain '=': A=B"),
        ({"A\0B": "x"}, "env names must not contain NUL bytes"),
        ({"A": "x\0y"}, "env value of A must not contain NUL bytes"),
        ({"BIG": "x" * 65534}, "env must total at most 64 KiB (names and values), got 65537 bytes"),
    ],
)
def test_bad_env_is_refused_saying_which(stub: Any, env: dict[str, str], message: str) -> None:
    before = job_ids(stub)
    assert refused(stub, env=env) == message
    assert job_ids(stub) == before


def test_env_of_64_kib_in_all_is_accepted(stub: Any) -> None:
    env = {"A": "x" * 32767, "B": "y" * 32767}  # names and values: exactly 64 KiB
    job = create(
        stub, JOB_PYTHON, "-c", "import os; print(len(os.environ['A'] + os.environ['B']))", env=env
    )
    assert ended(stub, job.id).status == "COMPLETED"
    assert output(stub, job.id) == b"65534\n"


# -- workingDir ------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["/var/tmp", "/tmp"])
def test_the_job_runs_in_its_working_dir_bound_writable(
    stub: Any, host_dir: Callable[..., Path], module_server: ServerProc, base: str
) -> None:
    # /tmp is private to a job: a working dir under the host's /tmp is bound into its view.
    where = host_dir(base, 0o777)
    job = create(stub, "sh", "-c", 'pwd; echo "$HOME" >written-by-job', workingDir=str(where))
    assert job.workingDir == str(where)
    assert ended(stub, job.id).status == "COMPLETED", ended(stub, job.id).reason
    assert output(stub, job.id) == f"{where}\n".encode()
    written = (where / "written-by-job").read_text()  # on the host, by the job's uid
    log = module_server.log_text()
    skip_unless("jobs run as their own uid" in log, "the job user is the server's here")
    assert (where / "written-by-job").stat().st_uid >= 1 << 16
    assert "job isolation: pid, mount, cgroup" in log
    assert written.endswith(f"/jobs/{job.id}/work\n")  # HOME is still its scratch dir
    assert stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT).workingDir == str(where)


def test_a_working_dir_above_the_data_dir_does_not_show_it(
    server_factory: ServerFactory, test_pki: TestPKI, host_dir: Callable[..., Path]
) -> None:
    where = host_dir(mode=0o777)
    with (
        server_factory("--data-dir", str(where / "data")) as srv,
        open_stub(test_pki, srv) as own,
    ):
        skip_unless("job isolation: pid, mount" in srv.log_text(), "no mount namespace here")
        script = (
            "ls -A data/jobs/*; touch data/planted 2>/dev/null || echo read-only; echo ok >mine"
        )
        job = create(own, "sh", "-c", script, workingDir=str(where))
        assert ended(own, job.id).status == "COMPLETED"
        # Only the job's own work dir shows through the cover: no record, no log, no key.
        assert output(own, job.id) == b"work\nread-only\n"
        assert (where / "mine").read_text() == "ok\n"  # the working dir itself is writable
        assert not (where / "data" / "planted").exists()


def test_a_working_dir_the_job_may_not_write_stays_unwritable(
    stub: Any, host_dir: Callable[..., Path], module_server: ServerProc
) -> None:
    skip_unless(
        "jobs run as their own uid" in module_server.log_text(), "jobs run as the server's user"
    )
    where = host_dir()  # 0755, root's: the job's uid may enter it, not write in it
    job = create(
        stub, "sh", "-c", "pwd; touch x 2>/dev/null || echo refused", workingDir=str(where)
    )
    assert ended(stub, job.id).status == "COMPLETED"
    assert output(stub, job.id) == f"{where}\nrefused\n".encode()
    assert not (where / "x").exists()


def test_bad_working_dirs_are_refused_saying_which(
    stub: Any, host_dir: Callable[..., Path], module_server: ServerProc, test_pki: TestPKI
) -> None:
    private = host_dir(mode=0o700)
    (private.parent / f"{private.name}-file").write_text("")
    a_file = private.parent / f"{private.name}-file"
    try:
        before = job_ids(stub)
        cases = {
            "relative/dir": "working directory must be an absolute path: relative/dir",
            "/nonexistent/dir": "working directory not found: /nonexistent/dir",
            str(a_file): f"working directory is not a directory: {a_file}",
            str(
                module_server.data_dir
            ): f"working directory is hidden from jobs: {module_server.data_dir}",
            str(module_server.data_dir / "jobs"): (
                f"working directory is hidden from jobs: {module_server.data_dir / 'jobs'}"
            ),
            str(test_pki.dir): f"working directory is hidden from jobs: {test_pki.dir}",
        }
        if "jobs run as their own uid" in module_server.log_text():
            cases[str(private)] = f"working directory is not usable by the job user: {private}"
        for path, message in cases.items():
            assert refused(stub, workingDir=path) == message
        assert job_ids(stub) == before
    finally:
        a_file.unlink()


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_create_flags_and_get(
    test_pki: TestPKI,
    module_server: ServerProc,
    stub: Any,
    host_dir: Callable[..., Path],
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    connection = cli_flags(test_pki, module_server.address)
    where = host_dir()
    capfdbinary.readouterr()
    code = main(
        [
            "--timeout=9",
            *connection,
            "create",
            "--timeout", "2m",
            "--env", "GREETING=hello world",
            "--env=ODD=a=b",
            "--workdir", str(where),
            "sh", "-c", 'echo "$GREETING/$ODD"; pwd',
        ]
    )  # fmt: skip
    out = capfdbinary.readouterr().out.decode()
    assert code == 0, out
    match = re.search(r"^ID: (\d+)$", out, re.MULTILINE)
    assert match, out
    job_id = match.group(1)
    job = ended(stub, job_id)
    assert (job.timeoutSeconds, dict(job.env), job.workingDir) == (
        120,
        {"GREETING": "hello world", "ODD": "a=b"},
        str(where),
    )
    assert output(stub, job_id) == f"hello world/a=b\n{where}\n".encode()
    assert main([*connection, "get", job_id]) == 0
    details = capfdbinary.readouterr().out.decode()
    assert details.endswith(
        f"Timeout: 120 s\nEnv: 'GREETING=hello world' ODD=a=b\nWorkingDir: {where}\n"
    )
    # A job without them shows none of these lines.
    plain = create(stub, "true")
    ended(stub, plain.id)
    assert main([*connection, "get", plain.id]) == 0
    details = capfdbinary.readouterr().out.decode()
    assert not any(word in details for word in ("Timeout:", "Env:", "WorkingDir:"))


def test_cli_create_refusal_is_one_error_line(
    test_pki: TestPKI, module_server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    capfdbinary.readouterr()
    code = main(
        [
            *cli_flags(test_pki, module_server.address),
            "create", "--workdir", "/nonexistent/dir", "true",
        ]
    )  # fmt: skip
    captured = capfdbinary.readouterr()
    assert code == 1
    assert captured.err.decode() == "Error: working directory not found: /nonexistent/dir\n"
