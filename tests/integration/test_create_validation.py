"""CreateJob refuses, through the real server, what the kernel would refuse at exec: no id used.

Each refusal is INVALID_ARGUMENT naming the limit, and the next job gets the next id, with
nothing listed in between (a refused create leaves no record).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import grpc_credentials

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_ARG_STRLEN = 32 * PAGE  # the kernel's limit on one argument, its NUL included
HOST_MB = os.sysconf("SC_PHYS_PAGES") * PAGE // 2**20
MESSAGE_LIMIT = 4 * 2**20  # the server's default largest request message


@pytest.fixture
def stub(test_pki: TestPKI, server: ServerProc) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    channel = grpc.secure_channel(server.address, grpc_credentials(test_pki, "admin-client"))
    yield worker_pb2_grpc.JobServiceStub(channel)
    channel.close()


def refused(stub: worker_pb2_grpc.JobServiceStub, request: worker_pb2.CreateJobReq) -> str:
    assert request.ByteSize() < MESSAGE_LIMIT  # refused for what it says, not for its size
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


def assert_no_id_used(stub: worker_pb2_grpc.JobServiceStub, server: ServerProc) -> None:
    assert list(stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs) == []
    assert not (server.data_dir / "jobs").exists() or not any((server.data_dir / "jobs").iterdir())
    job = stub.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    assert job.id == "1"


def test_one_argument_of_128_kib_is_refused_naming_the_limit(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    request = worker_pb2.CreateJobReq(command="echo", args=["ok", "x" * MAX_ARG_STRLEN])
    message = refused(stub, request)
    assert message == (
        "argument 2 is longer than the kernel allows for one argument (MAX_ARG_STRLEN:"
        f" {MAX_ARG_STRLEN - 1} bytes), got {MAX_ARG_STRLEN} bytes"
    )
    assert_no_id_used(stub, server)


def test_the_longest_argument_the_kernel_takes_runs(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    longest = "x" * (MAX_ARG_STRLEN - 1)
    job = stub.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", 'echo "${#1}"', "sh", longest]),
        timeout=10,
    )
    stream = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job.id), timeout=10)
    assert b"".join(chunk.payload for chunk in stream) == f"{MAX_ARG_STRLEN - 1}\n".encode()


def test_300000_one_byte_arguments_are_refused_naming_arg_max(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    request = worker_pb2.CreateJobReq(command="echo", args=["x"] * 300_000)
    message = refused(stub, request)
    assert message.startswith("args exceed the kernel's limit for one exec (ARG_MAX): ")
    assert_no_id_used(stub, server)


def test_memory_above_the_host_is_refused_naming_it(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    request = worker_pb2.CreateJobReq(command="true", maxMemory=2**31 - 1)
    assert refused(stub, request) == (
        f"maxMemory must be at most the host's memory ({HOST_MB} MB), got 2147483647"
    )
    assert_no_id_used(stub, server)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("/nonexistent/x", "no such file: /nonexistent/x"),
        ("bare-name-nowhere", "command not found in PATH: bare-name-nowhere"),
        (
            "./w/x",
            "relative command paths are not allowed: ./w/x (give an absolute path,"
            " or a bare name to look up in the job's PATH)",
        ),
    ],
)
def test_command_errors_say_what_was_looked_up(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc, command: str, message: str
) -> None:
    assert refused(stub, worker_pb2.CreateJobReq(command=command)) == message
    assert_no_id_used(stub, server)


def test_a_symlink_loop_as_command(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc, tmp_path: Path
) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    message = refused(stub, worker_pb2.CreateJobReq(command=str(loop)))
    assert message == f"too many levels of symbolic links: {loop}"
    assert_no_id_used(stub, server)


def test_max_cpu_message_and_rule_agree(
    stub: worker_pb2_grpc.JobServiceStub, server: ServerProc
) -> None:
    top = 100 * (os.cpu_count() or 1)
    message = refused(stub, worker_pb2.CreateJobReq(command="true", maxCPU=top + 1))
    assert message == (
        f"maxCPU must be between 0 and {top} (percent of one core; 0: the default, 100),"
        f" got {top + 1}"
    )
    assert_no_id_used(stub, server)
    zero = stub.CreateJob(worker_pb2.CreateJobReq(command="true", maxCPU=0), timeout=10)
    assert zero.maxCPU == 100
