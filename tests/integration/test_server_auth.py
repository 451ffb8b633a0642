"""Who may do what: the TLS handshake (refusals) and the role table (exact codes and messages)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobworker.api import worker_grpc, worker_pb2, worker_pb2_grpc
from jobworker.server.auth import JOB_SERVICE_RULES, ROLE_TABLE
from jobworker.server.service import JobService
from jobworker.wire.contract import SERVICE_NAME

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

ALL_RPCS = [
    "CreateJob", "GetJob", "StopJob", "GetJobs", "GetJobsStream", "ListJobs", "DeleteJob",
]  # fmt: skip
OPERATION = {
    "CreateJob": "create_job",
    "GetJob": "get_job",
    "StopJob": "stop_job",
    "GetJobs": "list_jobs",
    "GetJobsStream": "stream_job",
    "ListJobs": "list_jobs",
    "DeleteJob": "delete_job",
}


def call(stub: worker_pb2_grpc.JobServiceStub, rpc: str, job_id: str = "1") -> Any:
    """Make one call of ``rpc``; a stream is read to its end."""
    timeout = 10
    if rpc == "CreateJob":
        return stub.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=timeout)
    if rpc == "GetJob":
        return stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=timeout)
    if rpc == "StopJob":
        return stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=timeout)
    if rpc == "GetJobs":
        return stub.GetJobs(worker_pb2.EmptyRequest(), timeout=timeout)
    if rpc == "ListJobs":
        return stub.ListJobs(worker_pb2.ListJobsReq(), timeout=timeout)
    if rpc == "DeleteJob":
        return stub.DeleteJob(worker_pb2.DeleteJobReq(id=job_id), timeout=timeout)
    return list(stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=timeout))


def first_output(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> bytes:
    """Wait for the job's first output (so a stop cannot come before it)."""
    call = stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=10)
    chunk: bytes = next(call).payload
    call.cancel()
    return chunk


def test_the_role_table_names_every_rpc_of_the_service() -> None:
    proto_rpcs = set(worker_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name)
    generated = set(worker_grpc.JobServiceServicer().service.methods)
    assert proto_rpcs == generated == set(ALL_RPCS)
    assert set(JOB_SERVICE_RULES) == proto_rpcs, "an RPC without a rule is denied to everyone"
    assert {(SERVICE_NAME, name) for name in proto_rpcs} <= set(ROLE_TABLE)
    assert {name: rule.operation for name, rule in JOB_SERVICE_RULES.items()} == OPERATION
    served = set(JobService(manager=None).methods())  # type: ignore[arg-type]
    assert served == proto_rpcs


def test_admin_may_do_everything(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "echo x; exec sleep 30"]), timeout=10
    )
    assert first_output(admin, job.id) == b"x\n"
    assert call(admin, "GetJob", job.id).status == "RUNNING"
    assert [j.id for j in call(admin, "GetJobs").jobs] == [job.id]
    assert [j.id for j in call(admin, "ListJobs").jobs] == [job.id]
    assert call(admin, "StopJob", job.id).status == "STOPPED"
    assert b"".join(c.payload for c in call(admin, "GetJobsStream", job.id)) == b"x\n"


def test_viewer_may_read_but_not_create_or_stop(
    grpc_channel_for: Callable[[str], grpc.Channel], server: ServerProc
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    viewer = worker_pb2_grpc.JobServiceStub(grpc_channel_for("viewer-client"))
    job = admin.CreateJob(
        worker_pb2.CreateJobReq(command="sh", args=["-c", "echo y; exec sleep 30"]), timeout=10
    )
    assert first_output(viewer, job.id) == b"y\n"
    for rpc in ("CreateJob", "StopJob", "DeleteJob"):
        with pytest.raises(grpc.RpcError) as caught:
            call(viewer, rpc, job.id)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == (
            f"role viewer is not allowed to perform operation {OPERATION[rpc]}"
        )
    assert call(viewer, "GetJob", job.id).status == "RUNNING"  # the stop was not done
    assert [j.id for j in call(viewer, "GetJobs").jobs] == [job.id]
    assert [j.id for j in call(viewer, "ListJobs").jobs] == [job.id]
    admin.StopJob(worker_pb2.StopJobReq(id=job.id), timeout=10)
    assert b"".join(c.payload for c in call(viewer, "GetJobsStream", job.id)) == b"y\n"
    log = server.wait_for_log("method=GetJobsStream")  # the audit lines come after the call
    assert (
        "WARNING jobworker.audit rpc identity=viewer role=viewer method=StopJob op=stop_job "
        "job=- outcome=PERMISSION_DENIED" in log
    )


@pytest.mark.parametrize(("stem", "role"), [("noou-client", "none"), ("guest-client", "guest")])
def test_a_certificate_without_a_known_role_is_allowed_nothing(
    grpc_channel_for: Callable[[str], grpc.Channel], stem: str, role: str
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    job = admin.CreateJob(worker_pb2.CreateJobReq(command="true"), timeout=10)
    stranger = worker_pb2_grpc.JobServiceStub(grpc_channel_for(stem))
    for rpc in ALL_RPCS:
        with pytest.raises(grpc.RpcError) as caught:
            call(stranger, rpc, job.id)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, rpc
        assert caught.value.details() == (
            f"role {role} is not allowed to perform operation {OPERATION[rpc]}"
        )
    assert [j.id for j in call(admin, "GetJobs").jobs] == [job.id]  # nothing was created


def test_identity_is_per_connection_under_interleaved_calls(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    viewer = worker_pb2_grpc.JobServiceStub(grpc_channel_for("viewer-client"))

    def as_admin(_: int) -> str:
        return str(len(admin.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs))

    def as_viewer(_: int) -> str:
        try:
            viewer.StopJob(worker_pb2.StopJobReq(id="1"), timeout=10)
        except grpc.RpcError as exc:
            return str(exc.details())
        return "allowed?!"

    with ThreadPoolExecutor(8) as pool:
        admin_results = pool.map(as_admin, range(100))
        viewer_results = pool.map(as_viewer, range(100))
        assert set(admin_results) == {"0"}  # allowed, and answered from the (empty) table
        assert set(viewer_results) == {"role viewer is not allowed to perform operation stop_job"}


def refused_by_grpc(server: ServerProc, credentials: grpc.ChannelCredentials) -> grpc.RpcError:
    with grpc.secure_channel(server.address, credentials) as channel:
        stub = worker_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJobs(worker_pb2.EmptyRequest(), timeout=10)
    return caught.value


@pytest.mark.parametrize(
    ("stem", "reason"),
    [
        (None, "peer did not return a certificate"),
        ("foreign-client", "certificate verify failed: unable to get local issuer certificate"),
        ("expired-client", "certificate verify failed: certificate has expired"),
    ],
)
def test_bad_client_certificates_are_refused_at_the_handshake(
    server: ServerProc,
    test_pki: TestPKI,
    grpc_channel_for: Callable[[str], grpc.Channel],
    stem: str | None,
    reason: str,
) -> None:
    ca = test_pki.ca_cert.read_bytes()
    if stem is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=test_pki.key(stem).read_bytes(),
            certificate_chain=test_pki.cert(stem).read_bytes(),
        )
    error = refused_by_grpc(server, credentials)
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    log = server.wait_for_log(f"TLS handshake with .* failed: {reason}")
    assert "Traceback" not in log
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    assert admin.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs == []  # still serving


def test_a_tls_1_2_client_is_refused(
    server: ServerProc, test_pki: TestPKI, grpc_channel_for: Callable[[str], grpc.Channel]
) -> None:
    context = ssl.create_default_context(cafile=test_pki.ca_cert)
    context.load_cert_chain(test_pki.cert("admin-client"), test_pki.key("admin-client"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((server.host, server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),  # an alert or EOF: the server sends no alert
    ):
        context.wrap_socket(raw, server_hostname=server.host)
    server.wait_for_log("TLS handshake with .* failed: unsupported protocol")
    admin = worker_pb2_grpc.JobServiceStub(grpc_channel_for("admin-client"))
    assert admin.GetJobs(worker_pb2.EmptyRequest(), timeout=10).jobs == []


def test_the_server_selects_alpn_h2_and_tls_1_3(server: ServerProc, test_pki: TestPKI) -> None:
    context = ssl.create_default_context(cafile=test_pki.ca_cert)
    context.load_cert_chain(test_pki.cert("admin-client"), test_pki.key("admin-client"))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((server.host, server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server.host) as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "h2"
