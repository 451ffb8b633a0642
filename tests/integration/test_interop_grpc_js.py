"""The wire contract as other client stacks see it: grpc-js (Node.js) and grpcio.

The grpc-js client is an unchanged @grpc/grpc-js built from a frozen copy of the spec's proto
(tests/interop/node, installed by `npm ci` from its lockfile). Every error message of the spec
must reach it exactly as written, non-ASCII text and ``%`` included: the ``grpc-message``
trailer is percent-encoded only where the gRPC protocol says so, and grpc-js (which decodes
with ``decodeURI``) shows anything more as escapes.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.client import RpcError, open_client
from tests.support import skip_unless

if TYPE_CHECKING:
    from tests.integration.conftest import ServerProc
    from tests.support import TestPKI

NODE_CLIENT = Path(__file__).resolve().parents[1] / "interop" / "node"

OK, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 0, 3, 5, 7, 9


def run_node_client(
    server: ServerProc, test_pki: TestPKI, stem: str, calls: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    node = shutil.which("node")
    skip_unless(node is not None, "node (Node.js) is not installed")
    skip_unless(
        (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        f"@grpc/grpc-js is not installed: run `npm ci` in {NODE_CLIENT}",
    )
    assert node is not None
    result = subprocess.run(
        [
            node,
            str(NODE_CLIENT / "client.js"),
            server.address,
            str(test_pki.ca_cert),
            str(test_pki.cert(stem)),
            str(test_pki.key(stem)),
        ],
        input=json.dumps(calls).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    assert len(answers) == len(calls)
    return answers


def test_every_spec_error_reaches_grpc_js_exactly(server: ServerProc, test_pki: TestPKI) -> None:
    create = {"command": "sh", "args": ["-c", "printf 'h\\303\\251llo\\n'; exit 3"]}
    answers = run_node_client(
        server,
        test_pki,
        "admin-client",
        [
            {"method": "CreateJob", "request": create},
            {"method": "GetJobsStream", "request": {"id": "1"}},
            {"method": "StopJob", "request": {"id": "1"}},
            {"method": "GetJob", "request": {"id": "999"}},
            {"method": "StopJob", "request": {"id": "999"}},
            {"method": "GetJobsStream", "request": {"id": "999"}},
            {"method": "CreateJob", "request": {"command": "invalid-command"}},
            {"method": "CreateJob", "request": {"command": "h\u00e9llo"}},
            {"method": "CreateJob", "request": {"command": "50%off"}},
        ],
    )
    created, streamed, *errors = answers
    assert created["ok"]["id"] == "1"
    assert created["ok"]["status"] in ("INITIALIZING", "RUNNING")
    assert (streamed["code"], base64.b64decode(streamed["payload"])) == (OK, "héllo\n".encode())
    assert streamed["trailers"]["jobworker-status"] == "FAILED"
    assert streamed["trailers"]["jobworker-exit-code"] == "3"
    assert [(a["code"], a["details"]) for a in errors] == [
        (FAILED_PRECONDITION, "job is not running: 1 (current status: FAILED)"),
        (NOT_FOUND, "job not found: 999"),
        (NOT_FOUND, "job not found: 999"),
        (NOT_FOUND, "job not found: 999"),
        (INVALID_ARGUMENT, "command not found in PATH: invalid-command"),
        (INVALID_ARGUMENT, "command not found in PATH: h\u00e9llo"),
        (INVALID_ARGUMENT, "command not found in PATH: 50%off"),
    ]


def test_grpc_js_reads_the_jobs_final_status_in_the_stream_trailers(
    server: ServerProc, test_pki: TestPKI
) -> None:
    """The spec's client knows no offset; it reads the trailers, also of a trailers-only
    response (a job without output)."""
    answers = run_node_client(
        server,
        test_pki,
        "admin-client",
        [
            {"method": "CreateJob", "request": {"command": "true"}},
            {"method": "GetJobsStream", "request": {"id": "1"}},
            {"method": "CreateJob", "request": {"command": "sh", "args": ["-c", "echo hi"]}},
            {"method": "GetJobsStream", "request": {"id": "2"}},
            {"method": "GetJobsStream", "request": {"id": "999"}},
        ],
    )
    _, silent, _, talking, unknown = answers
    assert (silent["code"], silent["payload"]) == (OK, "")
    assert (talking["code"], base64.b64decode(talking["payload"])) == (OK, b"hi\n")
    for streamed in (silent, talking):
        assert streamed["trailers"]["jobworker-status"] == "COMPLETED"
        assert streamed["trailers"]["jobworker-exit-code"] == "0"
    assert silent["trailers"]["jobworker-offset"] == "0"  # headers and trailers in one block
    assert unknown["code"] == NOT_FOUND
    assert "jobworker-status" not in unknown["trailers"]


def test_a_denied_call_reaches_grpc_js_exactly(server: ServerProc, test_pki: TestPKI) -> None:
    (denied,) = run_node_client(
        server, test_pki, "viewer-client", [{"method": "CreateJob", "request": {"command": "true"}}]
    )
    assert (denied["code"], denied["details"]) == (
        PERMISSION_DENIED,
        "role viewer is not allowed to perform operation create_job",
    )


@pytest.mark.parametrize("command", ["h\u00e9llo", "50%off", "\u65e5\u672c\u8a9e: (x)"])
def test_non_ascii_and_percent_round_trip_through_grpcio(
    grpc_channel_for: Callable[[str], grpc.Channel], command: str
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    with pytest.raises(grpc.RpcError) as caught:
        admin.CreateJob(worker_pb2.CreateJobReq(command=command), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"command not found in PATH: {command}"


@pytest.mark.parametrize("command", ["h\u00e9llo", "50%off", "\u65e5\u672c\u8a9e: (x)"])
async def test_non_ascii_and_percent_round_trip_through_our_client(
    server: ServerProc, test_pki: TestPKI, command: str
) -> None:
    async with open_client(
        server.address,
        cert=test_pki.cert("admin-client"),
        key=test_pki.key("admin-client"),
        ca=test_pki.ca_cert,
    ) as client:
        with pytest.raises(RpcError) as caught:
            await client.create(command)
    assert (caught.value.code_name, caught.value.message) == (
        "INVALID_ARGUMENT",
        f"command not found in PATH: {command}",
    )
