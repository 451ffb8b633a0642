"""CreateJob's requestId through the real server: a retry with the same key (after a deadline,
from many threads at once, after a restart) returns the job the key started and starts none;
keys are per client identity, expire after 24 h, and are checked. The CLI sends one per create
and sends the create again, with it, when its connection drops mid-call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.cli import main
from jobworker.cli.args import parse
from jobworker.cli.commands import retries_create
from jobworker.errors import (
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    RpcError,
    ServerShuttingDown,
)
from tests.support import CutFirstProxy, cli_flags, grpc_credentials, job_request, wait_job_ended

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory, ServerProc

TIMEOUT = 10.0
TINY_DEADLINE_S = 0.005  # the issue's: most creates are cut off, some after their job started
ROUNDS = 50
MAX_ROUNDS = 500  # more rounds only until one create has hit its deadline


@contextlib.contextmanager
def open_stub(test_pki: TestPKI, server: ServerProc, stem: str = "admin-client") -> Iterator[Any]:
    with grpc.secure_channel(server.address, grpc_credentials(test_pki, stem)) as channel:
        yield worker_pb2_grpc.JobServiceStub(channel)


@pytest.fixture
def stub(test_pki: TestPKI, server: ServerProc) -> Iterator[Any]:
    with open_stub(test_pki, server) as admin:
        yield admin


def keyed(request_id: str, command: str = "true", *args: str) -> worker_pb2.CreateJobReq:
    request = job_request(command, args)
    request.requestId = request_id
    return request


def job_dirs(data_dir: Path) -> list[str]:
    return sorted((p.name for p in (data_dir / "jobs").iterdir()), key=int)


def stored_key(data_dir: Path, job_id: str) -> str:
    key: str = json.loads((data_dir / "jobs" / job_id / "job.json").read_text())["request_id"]
    return key


def listed(stub: Any) -> list[str]:
    return [job.id for job in stub.GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs]


# -- the server ------------------------------------------------------------------------------


def test_the_same_key_twice_returns_the_same_job_and_starts_nothing(
    stub: Any, server: ServerProc
) -> None:
    first = stub.CreateJob(keyed("abc"), timeout=TIMEOUT)
    ended = wait_job_ended(stub, first.id)
    again = stub.CreateJob(keyed("abc", "false"), timeout=TIMEOUT)  # the key alone decides
    assert again.id == first.id
    assert (again.command, again.status, again.exitCode) == ("true", "COMPLETED", 0)
    assert again.endTime == ended.endTime  # its current state, not the first answer's
    assert listed(stub) == [first.id]
    assert job_dirs(server.data_dir) == [first.id]
    assert stored_key(server.data_dir, first.id) == "abc"
    other = stub.CreateJob(keyed(""), timeout=TIMEOUT)  # no key: a job every time
    assert stub.CreateJob(keyed(""), timeout=TIMEOUT).id != other.id


def test_two_identities_with_one_key_get_two_jobs(test_pki: TestPKI, server: ServerProc) -> None:
    with open_stub(test_pki, server) as admin, open_stub(test_pki, server, "alice-client") as alice:
        mine = admin.CreateJob(keyed("shared"), timeout=TIMEOUT)
        hers = alice.CreateJob(keyed("shared"), timeout=TIMEOUT)
        assert mine.id != hers.id
        assert (mine.owner, hers.owner) == ("admin", "alice")
        assert admin.CreateJob(keyed("shared"), timeout=TIMEOUT).id == mine.id
        assert alice.CreateJob(keyed("shared"), timeout=TIMEOUT).id == hers.id
        assert sorted(listed(admin)) == sorted([mine.id, hers.id])


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        ("k" * 129, "requestId must be at most 128 characters, got 129"),
        ("bell\x07", "requestId must be printable ASCII: character 5 is U+0007"),
        ("na\u00efve", "requestId must be printable ASCII: character 3 is U+00EF"),
    ],
)
def test_bad_keys_are_refused_and_start_nothing(
    stub: Any, server: ServerProc, request_id: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(keyed(request_id), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == message
    assert listed(stub) == []
    assert job_dirs(server.data_dir) == []


def test_retries_after_a_deadline_leave_exactly_one_job_per_key(
    stub: Any, server: ServerProc
) -> None:
    # The case: with 5 ms deadlines most creates fail DEADLINE_EXCEEDED, many of them
    # after their job started. Each is followed by a retry with its key and a normal deadline.
    listed(stub)  # the channel is connected: the deadlines are the calls' own
    keys: list[str] = []
    answers: dict[str, str] = {}
    failures: list[grpc.StatusCode] = []
    cut_off = 0

    def replayed() -> int:  # retries that found the job of a create cut off after its start
        return server.log_text().count("returned again, for a repeated request id")

    while len(keys) < ROUNDS or (not (cut_off and replayed()) and len(keys) < MAX_ROUNDS):
        key = f"retry-{len(keys)}"
        keys.append(key)
        try:
            stub.CreateJob(keyed(key), timeout=TINY_DEADLINE_S)
        except grpc.RpcError as exc:
            failures.append(exc.code())
        answers[key] = stub.CreateJob(keyed(key), timeout=TIMEOUT).id
        cut_off = len(failures)
    assert set(failures) <= {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert cut_off, f"none of {len(keys)} creates hit a {TINY_DEADLINE_S} s deadline"
    assert replayed(), f"no create of {len(keys)} was cut off after its job started"
    ids = listed(stub)
    assert len(ids) == len(keys)
    assert sorted(ids, key=int) == sorted(answers.values(), key=int)
    assert job_dirs(server.data_dir) == sorted(ids, key=int)
    assert sorted(stored_key(server.data_dir, job_id) for job_id in ids) == sorted(keys)


def test_concurrent_creates_with_one_key_make_one_job(stub: Any, server: ServerProc) -> None:
    request = keyed("together", "sleep", "30")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: stub.CreateJob(request, timeout=TIMEOUT), range(16)))
    assert {answer.id for answer in answers} == {"1"}
    assert {answer.status for answer in answers} == {"RUNNING"}  # each waited for the spawn
    assert job_dirs(server.data_dir) == ["1"]
    stub.StopJob(worker_pb2.StopJobReq(id="1"), timeout=TIMEOUT)


def test_a_deleted_job_drops_its_key(stub: Any, server: ServerProc) -> None:
    first = stub.CreateJob(keyed("k"), timeout=TIMEOUT)
    wait_job_ended(stub, first.id)
    stub.DeleteJob(worker_pb2.DeleteJobReq(id=first.id), timeout=TIMEOUT)
    second = stub.CreateJob(keyed("k"), timeout=TIMEOUT)
    assert second.id != first.id
    assert stub.CreateJob(keyed("k"), timeout=TIMEOUT).id == second.id
    assert job_dirs(server.data_dir) == [second.id]


def age_key(data_dir: Path, job_id: str, hours: float) -> None:
    """Rewrite the job's record as if its key had been used ``hours`` ago."""
    path = data_dir / "jobs" / job_id / "job.json"
    record = json.loads(path.read_text())
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    record["request_time"] = moment.isoformat()
    path.write_text(json.dumps(record))


def test_keys_survive_a_restart_for_24_hours(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    with server_factory() as first, open_stub(test_pki, first) as stub:
        kept = stub.CreateJob(keyed("kept"), timeout=TIMEOUT)
        old = stub.CreateJob(keyed("old"), timeout=TIMEOUT)
        for job in (kept, old):
            wait_job_ended(stub, job.id)
    age_key(first.data_dir, kept.id, hours=23)
    age_key(first.data_dir, old.id, hours=25)
    with (
        server_factory("--data-dir", str(first.data_dir)) as second,
        open_stub(test_pki, second) as stub,
    ):
        again = stub.CreateJob(keyed("kept"), timeout=TIMEOUT)
        assert (again.id, again.status) == (kept.id, "COMPLETED")
        renewed = stub.CreateJob(keyed("old"), timeout=TIMEOUT)  # expired: a new job
        assert renewed.id not in (kept.id, old.id)
        assert stub.CreateJob(keyed("old"), timeout=TIMEOUT).id == renewed.id
        assert sorted(listed(stub)) == sorted([kept.id, old.id, renewed.id])


# -- the CLI ---------------------------------------------------------------------------------


def cli_args(test_pki: TestPKI, address: str) -> list[str]:
    return cli_flags(test_pki, address)


def created_id(out: bytes) -> str:
    match = re.search(r"^ID: (\d+)$", out.decode(), re.MULTILINE)
    assert match, out
    return match.group(1)


def test_the_cli_sends_a_fresh_key_per_create_or_the_one_given(
    test_pki: TestPKI, server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = []
    for _ in range(2):
        assert main([*cli_args(test_pki, server.address), "create", "true"]) == 0
        ids.append(created_id(capfdbinary.readouterr().out))
    keys = [stored_key(server.data_dir, job_id) for job_id in ids]
    assert ids[0] != ids[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", key) for key in keys)
    assert keys[0] != keys[1]
    given = [*cli_args(test_pki, server.address), "create", "--request-id", "nightly-1", "true"]
    assert main(given) == 0
    mine = created_id(capfdbinary.readouterr().out)
    assert main(given) == 0
    assert created_id(capfdbinary.readouterr().out) == mine
    assert stored_key(server.data_dir, mine) == "nightly-1"
    assert len(job_dirs(server.data_dir)) == 3


def test_the_cli_sends_the_create_again_when_the_connection_drops(
    test_pki: TestPKI, server: ServerProc, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # The first connection drops after the server started the job, before its answer gets
    # through: the CLI cannot know whether the job exists, and sends the create again.
    proxy = CutFirstProxy((server.host, server.port), (server.data_dir / "jobs" / "1").exists)
    try:
        code = main([*cli_args(test_pki, proxy.address), "create", "echo", "once"])
    finally:
        proxy.close()
    captured = capfdbinary.readouterr()
    assert proxy.cut.is_set()
    assert proxy.accepted == 2
    assert code == 0, captured.err
    assert created_id(captured.out) == "1"
    assert "connection lost" in captured.err.decode()
    assert "sending the create again (request id " in captured.err.decode()
    assert job_dirs(server.data_dir) == ["1"]
    assert (server.data_dir / "jobs" / "1" / "output.log").read_bytes() == b"once\n"


@pytest.mark.parametrize(
    ("error", "again"),
    [
        (ConnectionLost("the server closed the connection"), True),
        (DeadlineExceeded(5.0), True),
        (RpcError("UNAVAILABLE", "upstream connect error"), True),
        (RpcError("DEADLINE_EXCEEDED", "deadline exceeded"), True),
        (ConnectError("cannot connect to localhost:1: connection refused"), False),
        (ServerShuttingDown(), False),
        (RpcError("INVALID_ARGUMENT", "requestId must be at most 128 characters"), False),
        (RpcError("RESOURCE_EXHAUSTED", "too many running jobs: 2 (limit 2)"), False),
        (RpcError("INTERNAL", "internal error"), False),
    ],
)
def test_the_cli_sends_a_create_again_only_when_its_fate_is_unknown(
    error: RpcError, again: bool
) -> None:
    assert retries_create(error) is again


def test_the_request_id_flag_is_the_cli_s_and_later_words_the_job_s() -> None:
    command = parse(["create", "--request-id=a1", "echo", "--request-id", "b2"])
    assert (command.request_id, command.command, command.args) == (
        "a1",
        "echo",
        ("--request-id", "b2"),
    )
    spaced = parse(["--timeout", "3", "create", "--request-id", "x y", "true"])
    assert (spaced.request_id, spaced.command, spaced.connection.timeout) == ("x y", "true", 3.0)
    assert parse(["create", "true"]).request_id == ""  # the run makes a fresh one
