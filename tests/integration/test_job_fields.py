"""Beyond the spec's ten fields: why a job is in its state (reason), who created it (owner),
what it used (usage, live while it runs), and ListJobs by owner; and a client built from the
spec's own proto, which must see exactly what it saw before these fields existed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.support import JOB_PYTHON, grpc_credentials, job_request
from tests.support import wait_job_ended as ended

if TYPE_CHECKING:
    from tests.integration.conftest import ServerFactory, ServerProc
    from tests.support import TestPKI

SPEC_PROTO = Path(__file__).resolve().parents[1] / "interop" / "spec" / "worker.proto"
TIMEOUT = 10.0


@pytest.fixture
def stubs(test_pki: TestPKI, server: ServerProc) -> Iterator[dict[str, Any]]:
    """JobService stubs for the default admin (CN admin), alice (a second admin), viewer."""
    channels = {
        stem: grpc.secure_channel(server.address, grpc_credentials(test_pki, f"{stem}-client"))
        for stem in ("admin", "alice", "viewer")
    }
    yield {stem: worker_pb2_grpc.JobServiceStub(channel) for stem, channel in channels.items()}
    for channel in channels.values():
        channel.close()


def create(stub: Any, *args: str, **limits: int) -> Any:
    return stub.CreateJob(job_request(args[0], args[1:], **limits), timeout=TIMEOUT)


def test_the_owner_is_the_creators_cn_and_listings_filter_by_it(stubs: dict[str, Any]) -> None:
    mine = create(stubs["admin"], "true")
    hers = create(stubs["alice"], "true")
    assert (mine.owner, hers.owner) == ("admin", "alice")
    assert stubs["viewer"].GetJob(worker_pb2.GetJobReq(id=hers.id), timeout=TIMEOUT).owner == (
        "alice"
    )
    listed = stubs["viewer"].GetJobs(worker_pb2.EmptyRequest(), timeout=TIMEOUT).jobs
    assert {job.id: job.owner for job in listed} == {mine.id: "admin", hers.id: "alice"}
    by_alice = stubs["viewer"].ListJobs(worker_pb2.ListJobsReq(owner="alice"), timeout=TIMEOUT)
    assert [job.id for job in by_alice.jobs] == [hers.id]
    nobody = stubs["viewer"].ListJobs(worker_pb2.ListJobsReq(owner="mallory"), timeout=TIMEOUT)
    assert list(nobody.jobs) == []


def test_the_owner_survives_a_restart(server_factory: ServerFactory, test_pki: TestPKI) -> None:
    with (
        server_factory() as first,
        grpc.secure_channel(first.address, grpc_credentials(test_pki, "alice-client")) as ch,
    ):
        job = create(worker_pb2_grpc.JobServiceStub(ch), "true")
        ended(worker_pb2_grpc.JobServiceStub(ch), job.id)
    with (
        server_factory("--data-dir", str(first.data_dir)) as again,
        grpc.secure_channel(again.address, grpc_credentials(test_pki, "admin-client")) as ch,
    ):
        stub = worker_pb2_grpc.JobServiceStub(ch)
        assert stub.GetJob(worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT).owner == "alice"


def test_the_reason_says_why_each_job_ended(stubs: dict[str, Any]) -> None:
    admin = stubs["admin"]
    zero = ended(admin, create(admin, "true").id)
    three = ended(admin, create(admin, "sh", "-c", "exit 3").id)
    sleeper = create(admin, "sleep", "100")
    stopped = admin.StopJob(worker_pb2.StopJobReq(id=sleeper.id), timeout=TIMEOUT)
    hog = create(
        admin, JOB_PYTHON, "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])",
        maxMemory=50,
    )  # fmt: skip
    oom = ended(admin, hog.id)
    assert (zero.status, zero.reason) == ("COMPLETED", "exited with status 0")
    assert (three.status, three.reason) == ("FAILED", "exited with status 3")
    assert (stopped.status, stopped.reason) == ("STOPPED", "stopped by request")
    assert oom.status == "FAILED"
    assert oom.reason == "out of memory (limit 50 MB)"
    running = create(admin, "sleep", "100")
    assert running.reason == ""  # nothing to explain yet
    admin.StopJob(worker_pb2.StopJobReq(id=running.id), timeout=TIMEOUT)


def test_the_reason_of_a_shutdown_and_of_a_crash(
    server_factory: ServerFactory, test_pki: TestPKI
) -> None:
    def stub_of(srv: ServerProc) -> tuple[grpc.Channel, Any]:
        channel = grpc.secure_channel(srv.address, grpc_credentials(test_pki, "admin-client"))
        return channel, worker_pb2_grpc.JobServiceStub(channel)

    with server_factory() as first:  # left with SIGTERM: its running job is stopped
        channel, stub = stub_of(first)
        with channel:
            create(stub, "sleep", "100")
    with server_factory("--data-dir", str(first.data_dir), expect_exit=None) as second:
        channel, stub = stub_of(second)
        with channel:
            shut = stub.GetJob(worker_pb2.GetJobReq(id="1"), timeout=TIMEOUT)
            create(stub, "sleep", "100")
        second.process.kill()  # a crash: the end of job 2 is never seen
        second.process.wait(TIMEOUT)
    with server_factory("--data-dir", str(first.data_dir)) as third:
        channel, stub = stub_of(third)
        with channel:
            lost = stub.GetJob(worker_pb2.GetJobReq(id="2"), timeout=TIMEOUT)
    assert (shut.status, shut.reason) == ("STOPPED", "worker shutdown")
    assert (lost.status, lost.reason) == ("LOST", "worker restarted while the job was running")


def test_usage_grows_while_the_job_runs_and_is_final_after(stubs: dict[str, Any]) -> None:
    admin = stubs["admin"]
    burner = create(
        admin,
        JOB_PYTHON,
        "-c",
        "import sys, time\n"
        "sys.stdout.write('x' * 1000); sys.stdout.flush()\n"
        "end = time.monotonic() + 60\n"
        "while time.monotonic() < end: pass\n",
    )
    deadline = time.monotonic() + 30
    samples: list[Any] = []
    while len(samples) < 2 or samples[-1].cpuSeconds <= samples[0].cpuSeconds:
        assert time.monotonic() < deadline, f"cpuSeconds never grew: {samples}"
        samples.append(admin.GetJob(worker_pb2.GetJobReq(id=burner.id), timeout=TIMEOUT).usage)
        time.sleep(0.2)  # sampling a counter that moves on its own, with a deadline
    assert samples[-1].cpuSeconds > 0
    assert samples[-1].peakMemoryBytes > 0
    while samples[-1].outputBytes < 1000:
        assert time.monotonic() < deadline, "the output never showed in usage"
        samples.append(admin.GetJob(worker_pb2.GetJobReq(id=burner.id), timeout=TIMEOUT).usage)
        time.sleep(0.05)  # polling, with a deadline
    assert samples[-1].outputBytes == 1000
    stopped = admin.StopJob(worker_pb2.StopJobReq(id=burner.id), timeout=TIMEOUT)
    assert stopped.usage.cpuSeconds >= samples[-1].cpuSeconds
    assert stopped.usage.outputBytes == 1000
    final = admin.GetJob(worker_pb2.GetJobReq(id=burner.id), timeout=TIMEOUT).usage
    assert final == stopped.usage


@pytest.fixture(scope="module")
def spec_client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spec's own proto, compiled now, as a client written against the spec has it."""
    out = tmp_path_factory.mktemp("spec_client")
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{SPEC_PROTO.parent}",
            f"--python_out={out}", f"--grpc_python_out={out}", SPEC_PROTO.name,
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out


# A program of its own (the spec's worker.proto and ours cannot share a descriptor pool): the
# spec's Python example, with the calls a spec client makes; prints what it received.
SPEC_CLIENT = """
import json, sys
import grpc
import worker_pb2 as pb, worker_pb2_grpc as rpc
address, ca, cert, key, job_id = sys.argv[1:]
creds = grpc.ssl_channel_credentials(
    open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read()
)
with grpc.secure_channel(address, creds) as channel:
    stub = rpc.JobServiceStub(channel)
    job = stub.GetJob(pb.GetJobReq(id=job_id), timeout=10)
    listed = stub.GetJobs(pb.EmptyRequest(), timeout=10)
    output = b"".join(c.payload for c in stub.GetJobsStream(pb.GetJobsStreamReq(id=job_id)))
    stopped = None
    try:
        stub.StopJob(pb.StopJobReq(id=job_id), timeout=10)
    except grpc.RpcError as exc:
        stopped = [exc.code().name, exc.details()]
def fields(message):
    return {f.name: v if not isinstance(v, bytes) else v.decode() for f, v in message.ListFields()}
print(json.dumps({
    "job": fields(job), "listed": [fields(j) for j in listed.jobs],
    "output": output.decode(), "stop": stopped,
    "known": sorted(f.name for f in pb.GetJobRes.DESCRIPTOR.fields),
}, default=list))
"""

SPEC_JOB_FIELDS = [
    "args", "command", "endTime", "exitCode", "id", "maxCPU", "maxIOBPS", "maxMemory",
    "startTime", "status",
]  # fmt: skip


def test_a_client_of_the_spec_sees_exactly_the_spec_fields(
    spec_client_dir: Path, stubs: dict[str, Any], test_pki: TestPKI, server: ServerProc
) -> None:
    ours = stubs["admin"]
    job = create(ours, "sh", "-c", "echo hi; exit 4")
    full = ended(ours, job.id)
    stem = "admin-client"
    seen = subprocess.run(
        [
            sys.executable, "-c", SPEC_CLIENT, server.address, str(test_pki.ca_cert),
            str(test_pki.cert(stem)), str(test_pki.key(stem)), job.id,
        ],
        env={"PYTHONPATH": str(spec_client_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    got = json.loads(seen.stdout)
    assert got["known"] == SPEC_JOB_FIELDS  # the client really knows only the spec's fields
    expected = {
        name: list(value) if name == "args" else value
        for name in SPEC_JOB_FIELDS
        if (value := getattr(full, name)) not in ("", 0) and value != []
    }
    assert got["job"] == expected
    assert got["listed"] == [expected]
    assert got["output"] == "hi\n"
    assert got["stop"] == [
        "FAILED_PRECONDITION",
        f"job is not running: {job.id} (current status: FAILED)",
    ]


def test_block_io_is_counted_from_the_job_s_cgroup(stubs: dict[str, Any]) -> None:
    """Direct IO goes through the block layer, where the job's cgroup counts it (page-cache
    writeback is not charged to the job on cgroup v1: direct IO makes the test exact)."""
    admin = stubs["admin"]
    mib = 1 << 20
    job = create(
        admin, "sh", "-c",
        "dd if=/dev/zero of=f bs=64k count=16 oflag=direct 2>/dev/null && "
        "dd if=f of=/dev/null bs=64k iflag=direct 2>/dev/null",
    )  # fmt: skip
    done = ended(admin, job.id)
    assert (done.status, done.exitCode) == ("COMPLETED", 0), done.reason
    assert done.usage.ioWriteBytes >= mib
    assert done.usage.ioReadBytes >= mib
